"""Stage 1: COCO caption files (+ optional Karpathy split) → one manifest per split and a report.

Problems of single entries are counted, listed in the report and skipped — the run goes on: malformed
image or annotation entries, captions that are not strings, unknown image ids in captions, images without
captions, missing image files, empty captions, duplicate image or caption ids, images absent from the Karpathy
split. The counts are exact; the report lists the first LISTED_PER_KIND instances of each kind, and
missing_images.jsonl every missing image file (a rerun checks them all: one copied in since joins the dataset,
tasks/features.py ExtractAnnotations.output_problem). A file whose structure is wrong (not readable, not UTF-8,
not JSON, no top-level `images` / `annotations` lists, one of them twice) raises InputError naming the file and
the field.

The files are read by pipeline/coco_files.py, captions normalised by pipeline/captions.py, images split by
pipeline/splits.py (Karpathy's file when given, else split_of_image). A plug-in's image fields
(pipeline/extensions.py) are kept in the manifests beside the captions.

Memory: a caption file is read as a stream. What is kept of an image or a caption is
a few integers in arrays; file names and captions go to scratch files under the output directory (storage's
Spool), are put in image-id order part by part, and are copied into the manifests without being decoded again.
Memory grows by about 50 bytes per caption (under 500 MB for a million images with five captions each, the
process included); scratch disk peaks at about one and a half times the manifests' size while the stage runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import operator
import os
import shutil
import stat
import tempfile
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.collected import Collected, Sorted
from pipeline.coco_files import karpathy_split_codes
from pipeline.problems import LISTED_PER_KIND, PROBLEM_KINDS, Problems
from pipeline.errors import InputError
from pipeline.progress import Progress
from pipeline.splits import split_codes_changes, split_lookup
from storage import manifests
from storage.contents import in_threads
from storage.workspace import portable

log = logging.getLogger("captioner")

SPLITS = manifests.SPLITS
__all__ = ["LISTED_PER_KIND", "PROBLEM_KINDS", "extract_annotations", "make_annotations"]

# ------------------------------------------------------------------------------------------------ stage

_PART_LINES = 1 << 18   # images + captions put in order in memory at a time (about 40 MB of COCO captions)


class _Writer:
    """Writes the images kept, by id, into the split manifests: those without captions, outside their root,
    missing or not in the Karpathy split go to `problems`; counts images and captions per split and remembers
    the split of every image written (`ids`, `codes`)."""

    def __init__(self, writers: dict, roots: list[str], root_names: list[str], split_codes, fractions: tuple,
                 problems: Problems):
        self.writers, self.roots, self.problems = [writers[s] for s in SPLITS], roots, problems
        self.root_names, self.root_references = [manifests.json_string(r) for r in root_names], root_names
        self.split_codes = split_codes
        val, test, seed = fractions
        self.seed, self.test, self.test_or_val = f"{seed}:".encode(), test, test + val   # as split_of_image
        self.counts = {name: {"images": 0, "captions": 0} for name in SPLITS}
        self.ids, self.codes = array("q"), array("b")
        self.missing = []   # every missing image file, {root (as the manifests name it), path}: MISSING_FILE
        self.per_root = [{"root": r, "found": 0, "missing": 0} for r in root_names]   # image files of each root

    def write(self, part: dict) -> None:
        """The images of one part (_load_part), in id order."""
        problems, roots, at, sha256 = self.problems, self.roots, 0, hashlib.sha256
        raw, normalised, images, captions = part["raw"], part["normalised"], [0, 0, 0], [0, 0, 0]
        for place, image_id, k, n, name_json, name, found in zip(
                part["places"], part["ids"], part["files"], part["counts"], part["names_json"], part["names"],
                part["found"]):
            at += n
            if not found:
                if not n:
                    problems.add("image_without_captions", {"image_id": image_id, "path": name})
                elif not _inside_root(name):
                    problems.add("image_outside_root", {"image_id": image_id, "root": roots[k], "path": name})
                else:
                    problems.add("missing_image_file", {"image_id": image_id, "root": roots[k], "path": name})
                    self.missing.append({"root": self.root_references[k], "path": name})
                    self.per_root[k]["missing"] += 1
                continue
            self.per_root[k]["found"] += 1
            if self.split_codes is not None:
                code = int(self.split_codes[place])
                if code < 0:
                    problems.add("image_not_in_split", {"image_id": image_id, "path": name})
                    continue
            else:
                u = int.from_bytes(sha256(b"%s%d" % (self.seed, image_id)).digest()[:8], "big") / 2 ** 64
                code = 2 if u < self.test else 1 if u < self.test_or_val else 0
            self.writers[code].add(image_id, self.root_names[k], name_json,
                                   b'"%s"' % b'", "'.join(normalised[at - n:at]), b", ".join(raw[at - n:at]),
                                   part["extras"].get(place, b""))
            images[code] += 1
            captions[code] += n
            self.ids.append(image_id)
            self.codes.append(code)
        for code, name in enumerate(SPLITS):
            self.counts[name]["images"] += images[code]
            self.counts[name]["captions"] += captions[code]


def _inside_root(file_name: str) -> bool:
    """Whether a file_name names a file under its image root: relative, without a '..' component (symbolic
    links inside the root are the dataset's own business)."""
    if ".." not in file_name and not file_name.startswith(("/", "\\")):
        return True
    path = Path(file_name)
    return not path.is_absolute() and not file_name.startswith(("/", "\\")) and ".." not in path.parts


def _gather(wanted: np.ndarray, *files: list[bytes]) -> list[list[bytes]]:
    """Part files hold the lines of the entries `wanted` in the order read (ascending): the same lines in
    `wanted`'s order."""
    assert all(len(lines) == len(wanted) for lines in files), (len(wanted), [len(lines) for lines in files])
    if len(wanted) < 2:
        return [list(lines) for lines in files]
    take = operator.itemgetter(*np.searchsorted(np.sort(wanted), wanted).tolist())
    return [list(take(lines)) for lines in files]


def _load_part(files: dict, k: int, s: Sorted, lo: int, hi: int, caption_lo: int, caption_hi: int,
               roots: list[str], extras: dict) -> dict:
    """Part k of the spools (images lo … hi - 1 by id), read, put in order and its image files looked up."""
    lines = {key: manifests.read_lines(paths[k]) for key, paths in files.items()}
    for paths in files.values():
        paths[k].unlink()
    names_json, = _gather(s.index[lo:hi], lines["names"])
    raw, normalised = _gather(s.caption_order[caption_lo:caption_hi], lines["raw"], lines["normalised"])
    names = [n[1:-1].decode() if b"\\" not in n else json.loads(n) for n in names_json]
    files_, counts = s.files[lo:hi].tolist(), s.counts[lo:hi].tolist()
    checked = [j for j, (name, n) in enumerate(zip(names, counts)) if n > 0 and _inside_root(name)]
    found = [False] * len(names)
    for j, ok in zip(checked, in_threads(lambda part: list(map(_is_file, part)),
                                         [os.path.join(roots[files_[j]], names[j]) for j in checked])):
        found[j] = ok
    index = s.index[lo:hi].tolist() if extras else []
    return {"places": range(lo, hi), "ids": s.ids[lo:hi].tolist(), "files": files_, "counts": counts,
            "names_json": names_json, "names": names, "found": found,
            "raw": raw, "normalised": normalised,
            "extras": {lo + j: extras[i] for j, i in enumerate(index) if i in extras}}


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _write_manifests(outdir, c: Collected, s: Sorted, writer_args: tuple, scratch: Path,
                     progress_callback=None) -> _Writer:
    """Every image kept, by id, with its captions into <split>.jsonl of `outdir`: the spools are cut into parts of
    consecutive images (about _PART_LINES lines each); each part is put in order in memory (the next one in a
    thread meanwhile, its image files looked up) and written."""
    part = ((np.cumsum(s.counts + 1) - 1) // _PART_LINES).astype(np.int32)   # of each image, by id: ascending
    n_parts = int(part[-1]) + 1 if len(part) else 0
    name_parts = np.full(c.names.count, -1, np.int32)
    name_parts[s.index] = part
    caption_parts = np.full(len(s.kept), -1, np.int32)
    if len(part):
        caption_parts[s.kept] = part[s.image_of[s.kept]]
    del s.image_of, s.kept
    files = {"names": c.names.distribute(name_parts, n_parts, scratch, "names"),
             "raw": c.raw.distribute(caption_parts, n_parts, scratch, "raw"),
             "normalised": c.normalised.distribute(caption_parts, n_parts, scratch, "normalised")}
    for spool in (c.names, c.raw, c.normalised):
        spool.path.unlink()
    bounds = np.searchsorted(part, np.arange(n_parts + 1)).tolist()
    caption_bounds = np.concatenate([[0], np.cumsum(s.counts)])[bounds].tolist()
    load = lambda k: _load_part(files, k, s, bounds[k], bounds[k + 1], caption_bounds[k], caption_bounds[k + 1],
                                writer_args[0], c.extras)
    progress = Progress(len(s.ids), "checking image files", "images", progress_callback)
    with contextlib.ExitStack() as stack:
        writers = {name: stack.enter_context(manifests.ManifestWriter(manifests.manifest_path(outdir, name)))
                   for name in SPLITS}
        writer = _Writer(writers, *writer_args)
        pool = stack.enter_context(ThreadPoolExecutor(1))
        loading = pool.submit(load, 0) if n_parts else None
        for k in range(n_parts):
            loaded = loading.result()
            loading = pool.submit(load, k + 1) if k + 1 < n_parts else None
            writer.write(loaded)
            progress.update(bounds[k + 1] - bounds[k])
    return writer



def _write_annotations(outdir, annotation_files, roots: list[str], root_names: list[str], karpathy_split,
                       val_fraction: float, test_fraction: float, seed: int,
                       progress_callback=None) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Read the caption files (`roots`: their resolved image roots, `root_names`: how the manifests name them),
    write <split>.jsonl of every split into `outdir`. Returns (report, (ids, split indexes) of the images
    written, by id)."""
    problems, files = Problems(), [str(p) for p in annotation_files]
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=outdir))
    try:
        collected = Collected(scratch)
        for path in annotation_files:
            collected.read(path, problems, progress_callback)
        collected.close()
        karpathy = karpathy_split_codes(karpathy_split) if karpathy_split else None
        s = Sorted(collected, files, problems)
        collected.release()
        split_codes = split_lookup(*karpathy[:2], s.ids) if karpathy else None
        split_file = _split_file_report(karpathy, s.ids, problems) if karpathy else None
        writer = _write_manifests(outdir, collected, s, (roots, root_names, split_codes,
                                                         (val_fraction, test_fraction, seed), problems),
                                  scratch, progress_callback)
        manifests.write_jsonl(Path(outdir) / manifests.MISSING_FILE, writer.missing)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "annotation_files": files,
        "image_roots": list(roots),
        "split_method": f"karpathy:{karpathy_split}" if karpathy_split else
                        f"fractions(val={val_fraction}, test={test_fraction}, seed={seed})",
        "normalisation": "NFKC, lowercase, non-alphanumerics to spaces, inner apostrophes kept, spaces collapsed",
        "splits": writer.counts,
        "image_files_per_root": writer.per_root,
        **({"split_file": split_file} if split_file else {}),
        "problem_counts": dict(problems.counts),
        "problems": problems.lists(),
        "problems_listed_at_most": problems.limit,
    }
    for kind, count in problems.counts.items():
        if count:
            log.warning("annotations: %d × %s (first: %s) — skipped, %s", count, kind, problems.listed[kind][0],
                        "listed in report.json" if count <= problems.limit else
                        f"the first {problems.limit} listed in report.json")
    log.info("annotations: %s", ", ".join(f"{s} {c['images']} images / {c['captions']} captions"
                                          for s, c in report["splits"].items()))
    return report, (np.frombuffer(writer.ids, np.int64), np.frombuffer(writer.codes, np.int8))


def _split_file_report(karpathy, annotated_ids: np.ndarray, problems: Problems) -> dict:
    """The split file's images per split, and those in no caption file (a caption file left out of the config
    shrinks a split); its ids listed in two splits go to `problems` (split_file_conflict)."""
    ids, codes, conflicts = karpathy
    for image_id in conflicts.tolist():
        kept = SPLITS[codes[np.searchsorted(ids, image_id)]]
        problems.add("split_file_conflict", {"image_id": image_id, "split": kept})
    absent = ~np.isin(ids, annotated_ids)
    report = {"listed": {s: int(np.sum(codes == k)) for k, s in enumerate(SPLITS)},
              "in_no_caption_file": {s: int(np.sum(absent & (codes == k))) for k, s in enumerate(SPLITS)}}
    if absent.any():
        log.warning("annotations: %s of the split file's images are in no caption file: those splits are smaller "
                    "than the split file says. Fix: list every caption file it covers in [dataset] annotations "
                    "(COCO 2014: captions_train2014.json and captions_val2014.json)",
                    ", ".join(f"{n} of {report['listed'][s]} {s}" for s, n in report["in_no_caption_file"].items()
                              if n))
    return report


def extract_annotations(annotation_files, image_roots, karpathy_split=None, val_fraction=0.05,
                        test_fraction=0.05, seed=0, progress_callback=None) -> tuple[dict, dict]:
    """Read COCO caption files (with their image roots, same order) and split them by image.

    Returns (splits, report): splits maps 'train'/'val'/'test' to manifest records (sorted by image id),
    report holds counts and the problems found (see PROBLEM_KINDS). Holds every record in memory (tests,
    small datasets); the stage writes them as it goes (make_annotations)."""
    roots = [str(Path(r).expanduser().resolve()) for r in image_roots]
    with tempfile.TemporaryDirectory(prefix="annotations-") as tmp:
        report, _ = _write_annotations(tmp, annotation_files, roots, roots, karpathy_split, val_fraction,
                                       test_fraction, seed, progress_callback)
        return {name: manifests.read_manifest(manifests.manifest_path(tmp, name)) for name in SPLITS}, report


def _split_method(output) -> str | None:
    """How an annotations output was split (its report's split_method), or None when its report is unreadable."""
    try:
        return manifests.read_json(Path(output) / manifests.REPORT_FILE)["split_method"]
    except (OSError, ValueError, KeyError):
        return None


def make_annotations(outdir: str | os.PathLike, annotation_files, image_roots, karpathy_split=None,
                     val_fraction=0.05, test_fraction=0.05, seed=0, progress_callback=None, previous=None,
                     workspace_root=None) -> dict:
    """Stage 1 entry point: read the caption files, write <split>.jsonl for every split and report.json into
    `outdir`. Image roots are written as references that survive a move (storage.manifests.root_reference):
    relative to `workspace_root` when inside it (the demo's), else `images:<k>`, the k-th configured root.
    `previous`: earlier annotations outputs, most recent first (manifests.earlier_outputs; or one): the first
    split the same way (its split_method: the same split file, or the same fractions and seed; another
    config's outputs in the workspace may not be) is compared with this one ("split_changes"; the goal is 0
    moved images). Returns the report."""
    roots = [str(Path(r).expanduser().resolve()) for r in image_roots]
    references = {}
    if workspace_root is not None:
        references = {str(Path(r).expanduser().resolve()): manifests.root_reference(r, k, workspace_root)
                      for k, r in enumerate(image_roots)}
    report, assignment = _write_annotations(outdir, annotation_files, roots, [references.get(r, r) for r in roots],
                                            karpathy_split, val_fraction, test_fraction, seed, progress_callback)
    for k, root in enumerate(report["image_files_per_root"]):
        if root["missing"] and not root["found"]:   # an unmounted or wrong folder, not a few lost files
            for name in SPLITS:
                manifests.manifest_path(outdir, name).unlink(missing_ok=True)
            listed = [p["path"] for p in report["problems"].get("missing_image_file", []) if p["root"] == roots[k]]
            example = f" (first: {listed[0]})" if listed else ""
            raise InputError(f"[dataset] images: {roots[k]} (entry {k + 1}) holds none of the {root['missing']} "
                             f"image files {annotation_files[k]} names{example}. Fix: mount or correct that folder "
                             "(one root per annotation file, same order), or remove the file from [dataset] "
                             "annotations.")
    if not report["splits"]["train"]["images"]:
        for name in SPLITS:
            manifests.manifest_path(outdir, name).unlink(missing_ok=True)
        found = ", ".join(f"{n} × {kind}" for kind, n in report["problem_counts"].items() if n) or "no images"
        raise InputError(f"{', '.join(map(str, annotation_files))}: no usable training image ({found}). Fix: check "
                         "that [dataset] images names the folder the file_name entries are relative to, one root "
                         "per annotation file, same order.")
    if workspace_root is not None:
        report["image_roots"] = [references[r] for r in report["image_roots"]]
        report["image_root_paths"] = {references[r]: r for r in references if references[r].startswith("images:")}
        report["annotation_files"] = [portable(r, workspace_root) for r in report["annotation_files"]]
        if karpathy_split:
            report["split_method"] = f"karpathy:{portable(karpathy_split, workspace_root)}"
    report["split_changes"] = {"previous": None}
    previous = next((p for p in ([previous] if isinstance(previous, (str, os.PathLike)) else previous or [])
                     if _split_method(p) == report["split_method"]), None)
    if previous is not None:
        changes = split_codes_changes(*manifests.split_assignment(previous), *assignment)
        report["split_changes"] = {"previous": Path(previous).name, **changes}
        (log.warning if changes["moved"] else log.info)(
            "annotations: %d of %d images also in the previous output (%s) changed split",
            changes["moved"], changes["compared_images"], Path(previous).name)
    manifests.write_json(Path(outdir) / manifests.REPORT_FILE, report)
    return report
