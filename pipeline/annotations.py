"""Stage 1: COCO caption files (+ optional Karpathy split) → one manifest per split and a report.

Caption normalisation rule (applied to every caption, documented in the README):
  1. Unicode NFKC, typographic apostrophes (’ ‘ ʼ) become ', then lowercase;
  2. every character that is not a letter, a digit or an apostrophe becomes a space
     (so "left-to-right," → "left to right");
  3. an apostrophe survives only between two letters/digits ("man's" stays, "dogs'" → "dogs");
  4. whitespace runs collapse to one space; leading/trailing space is removed.
Tokens are the space-separated words of the normalised caption.

Problems of single entries are counted, listed in the report and skipped — the run goes on: malformed
image or annotation entries, captions that are not strings, unknown image ids in captions, images without
captions, missing image files, empty captions, duplicate image or caption ids, images absent from the Karpathy
split. A file whose structure is wrong (not readable, not UTF-8, not JSON, no top-level `images` /
`annotations` lists) raises InputError naming the file and the field.

Splits: Karpathy's file when given, else split_of_image — a hash of (seed, image id) against the fractions,
so an image's split never changes when the file grows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import defaultdict
from pathlib import Path


from pipeline.errors import InputError
from pipeline.progress import Progress
from storage import manifests
from storage.workspace import portable

log = logging.getLogger("captioner")

SPLITS = manifests.SPLITS
PROBLEM_KINDS = (
    "malformed_image",             # images[i] not an object, or without an integer id or a string file_name
    "malformed_annotation",        # annotations[i] not an object, or without an integer image_id (or id)
    "caption_not_a_string",        # caption missing, null, a number, a list …: that caption dropped
    "caption_for_unknown_image",   # annotation whose image_id is not in images[]
    "image_without_captions",      # image with no (non-empty) caption: dropped
    "missing_image_file",          # images[].file_name not found under its image root: dropped
    "image_outside_root",          # images[].file_name absolute or climbing out of its root with '..': dropped
    "empty_caption",               # caption empty after normalisation: dropped
    "duplicate_image_id",          # the same image id listed again (same or another file): later one dropped
    "duplicate_caption_id",        # the same annotation id again: later one dropped
    "image_not_in_split",          # Karpathy split given but the image is not in it: dropped
)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_NOT_WORD = re.compile(r"[^\w']|_")
_LOOSE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


def normalize_caption(text: str) -> str:
    """Apply the normalisation rule of this module's docstring. 'A Dog,  running. ' → 'a dog running'."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    text = _NOT_WORD.sub(" ", text)
    text = _LOOSE_APOSTROPHE.sub(" ", text)
    return " ".join(text.split())


def tokenize(caption: str) -> list[str]:
    """Words of a caption after normalisation."""
    return normalize_caption(caption).split()


# ---------------------------------------------------------------------------------------------- reading

def _load_json(path: str | os.PathLike, what: str):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {e.strerror or e}. Fix: check the path in the config.") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {what} is not UTF-8 text (invalid byte at offset {e.start}). "
                         "Fix: re-save the file as UTF-8.") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: {what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}. "
                         "Fix: repair or re-download the file.") from e


def _expect(path, field: str, value, kind, kind_name: str):
    """`value` if it is a `kind` (a JSON true/false is never an int), else a file-level InputError."""
    if not _is(value, kind):
        raise InputError(f"{path}: {field}: expected {kind_name}, got {type(value).__name__} {value!r:.60}. "
                         "Fix: this does not look like a COCO captions file (captions_*.json); check the file.")
    return value


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)   # bool is an int subclass in Python


def _digit_metadata(image: dict) -> dict:
    """Optional per-image metadata of digit datasets (the demo writes it): `digits` (labels, left to right),
    `digit_boxes` ([x, y, w, h] in pixels, same order), `width`, `height`. Kept only when well-formed; it is
    used by the digit metrics of EvaluateCaptions (pipeline/digits.py), never by training."""
    digits, boxes = image.get("digits"), image.get("digit_boxes")
    if not (isinstance(digits, list) and all(isinstance(d, int) and 0 <= d <= 9 for d in digits)):
        return {}
    out = {"digits": digits}
    if (isinstance(boxes, list) and len(boxes) == len(digits)
            and all(isinstance(b, list) and len(b) == 4 for b in boxes)
            and isinstance(image.get("width"), int) and isinstance(image.get("height"), int)):
        out.update(digit_boxes=boxes, width=image["width"], height=image["height"])
    return out


def load_coco_captions(path: str | os.PathLike) -> tuple[list[dict], list[dict], dict[str, list]]:
    """Parse and type-check a COCO captions file → (images, annotations, problems): lists of
    {"id", "file_name", …digit metadata} and {"id" (or None), "image_id", "caption"}, and the malformed entries
    that were skipped {kind: [instance, …]} (malformed_image, malformed_annotation, caption_not_a_string).

    The file's structure is checked strictly — not JSON, or missing or wrongly typed top-level `images` /
    `annotations`: InputError naming the file. One bad entry among thousands is skipped and reported instead."""
    data = _load_json(path, "COCO captions file")
    _expect(path, "top level", data, dict, "a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise InputError(f"{path}: missing key '{key}' at top level. Fix: use a COCO captions file "
                             "(e.g. annotations/captions_train2014.json), not instances_* or another file.")
        _expect(path, key, data[key], list, "a list")
    problems = defaultdict(list)
    skip = lambda kind, where, i, reason, **more: problems[kind].append(
        {"file": str(path), "entry": f"{where}[{i}]", "reason": reason, **more})
    images = []
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            skip("malformed_image", "images", i, f"not an object: {image!r:.60}")
        elif not _is(image.get("id"), int):
            skip("malformed_image", "images", i, f"no integer 'id' (got {image.get('id')!r:.60})")
        elif not _is(image.get("file_name"), str):
            skip("malformed_image", "images", i, f"no string 'file_name' (got {image.get('file_name')!r:.60})",
                 image_id=image["id"])
        else:
            images.append({"id": image["id"], "file_name": image["file_name"], **_digit_metadata(image)})
    annotations = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            skip("malformed_annotation", "annotations", i, f"not an object: {ann!r:.60}")
        elif not _is(ann.get("image_id"), int):
            skip("malformed_annotation", "annotations", i, f"no integer 'image_id' (got {ann.get('image_id')!r:.60})")
        elif ann.get("id") is not None and not _is(ann["id"], int):
            skip("malformed_annotation", "annotations", i, f"'id' is not an integer (got {ann['id']!r:.60})",
                 image_id=ann["image_id"])
        elif not _is(ann.get("caption"), str):
            skip("caption_not_a_string", "annotations", i,
                 "no 'caption'" if "caption" not in ann else f"caption is {ann['caption']!r:.60}",
                 image_id=ann["image_id"], caption_id=ann.get("id"))
        else:
            annotations.append({"id": ann.get("id"), "image_id": ann["image_id"], "caption": ann["caption"]})
    return images, annotations, dict(problems)


def load_karpathy_split(path: str | os.PathLike) -> dict[int, str]:
    """Karpathy's dataset_coco.json → {coco image id: 'train' | 'val' | 'test'} ('restval' counts as train)."""
    data = _load_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: expected an object with an 'images' list (Karpathy's dataset_coco.json). "
                         "Fix: point [dataset] karpathy_split at dataset_coco.json.")
    split_of = {}
    for i, image in enumerate(data["images"]):
        _expect(path, f"images[{i}]", image, dict, "an object")
        for key in ("cocoid", "split"):
            if key not in image:
                raise InputError(f"{path}: images[{i}] has no '{key}'. Fix: use Karpathy's dataset_coco.json.")
        split = image["split"]
        if split not in ("train", "restval", "val", "test"):
            raise InputError(f"{path}: images[{i}].split = {split!r}: expected train, restval, val or test.")
        split_of[_expect(path, f"images[{i}].cocoid", image["cocoid"], int, "an integer")] = \
            "train" if split == "restval" else split
    return split_of


# --------------------------------------------------------------------------------------------- splitting

def split_of_image(image_id: int, val_fraction: float, test_fraction: float, seed: int) -> str:
    """An image's split, a pure function of (seed, image id): sha256("<seed>:<id>") read as a number in [0, 1),
    test below test_fraction, val below test_fraction + val_fraction, else train. Adding or removing other
    images never moves this one, so nightly reruns on a growing file keep their val/test images out of training.
    Split sizes are the fractions up to sampling noise (±√n), not exact counts."""
    digest = hashlib.sha256(f"{seed}:{int(image_id)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def split_by_fraction(image_ids, val_fraction: float, test_fraction: float, seed: int) -> dict[int, str]:
    """{image id: split} by split_of_image: independent of input order and of the other images."""
    return {int(i): split_of_image(i, val_fraction, test_fraction, seed) for i in set(image_ids)}


def split_changes(previous: dict[int, str], current: dict[int, str]) -> dict:
    """How many images present in both runs changed split (the goal is 0), with the first few as examples."""
    moved = sorted(i for i in current.keys() & previous.keys() if current[i] != previous[i])
    return {"compared_images": len(current.keys() & previous.keys()), "moved": len(moved),
            "examples": [{"image_id": i, "was": previous[i], "now": current[i]} for i in moved[:20]]}


# ------------------------------------------------------------------------------------------------ stage

def extract_annotations(annotation_files, image_roots, karpathy_split=None, val_fraction=0.05,
                        test_fraction=0.05, seed=0, progress_callback=None) -> tuple[dict, dict]:
    """Read COCO caption files (with their image roots, same order) and split them by image.

    Returns (splits, report): splits maps 'train'/'val'/'test' to manifest records (sorted by image id),
    report holds counts and every problem found (see PROBLEM_KINDS)."""
    problems = defaultdict(list)
    images, captions = _read_caption_files(annotation_files, image_roots, problems)
    usable = _usable_records(images, captions, problems, progress_callback)
    if karpathy_split:
        split_of = load_karpathy_split(karpathy_split)
        for record in usable:
            if record["image_id"] not in split_of:
                problems["image_not_in_split"].append({"image_id": record["image_id"], "path": record["path"]})
    else:
        split_of = split_by_fraction([r["image_id"] for r in usable], val_fraction, test_fraction, seed)
    splits = {name: [] for name in SPLITS}
    for record in usable:
        if record["image_id"] in split_of:
            splits[split_of[record["image_id"]]].append(record)

    report = {
        "annotation_files": [str(p) for p in annotation_files],
        "image_roots": [str(Path(r).expanduser().resolve()) for r in image_roots],
        "split_method": f"karpathy:{karpathy_split}" if karpathy_split else
                        f"fractions(val={val_fraction}, test={test_fraction}, seed={seed})",
        "normalisation": "NFKC, lowercase, non-alphanumerics to spaces, inner apostrophes kept, spaces collapsed",
        "splits": {name: {"images": len(recs), "captions": sum(len(r["captions"]) for r in recs)}
                   for name, recs in splits.items()},
        "problem_counts": {kind: len(problems[kind]) for kind in PROBLEM_KINDS},
        "problems": {kind: problems[kind] for kind in PROBLEM_KINDS if problems[kind]},
    }
    for kind, count in report["problem_counts"].items():
        if count:
            log.warning("annotations: %d × %s (first: %s) — skipped, listed in report.json",
                        count, kind, problems[kind][0])
    log.info("annotations: %s", ", ".join(f"{s} {c['images']} images / {c['captions']} captions"
                                          for s, c in report["splits"].items()))
    return splits, report


def _read_caption_files(annotation_files, image_roots, problems) -> tuple[dict, dict]:
    """(images {id: manifest record without captions}, captions {id: [(raw, normalised)]}) of every file;
    duplicates, captions of unknown images and empty captions go to `problems`."""
    images, captions, seen_caption_ids = {}, defaultdict(list), set()
    for path, root in zip(annotation_files, image_roots):
        file_images, file_annotations, file_problems = load_coco_captions(path)
        for kind, instances in file_problems.items():
            problems[kind].extend(instances)
        root = str(Path(root).expanduser().resolve())
        file_ids = set()
        for image in file_images:
            if image["id"] in images or image["id"] in file_ids:
                problems["duplicate_image_id"].append({"file": str(path), "image_id": image["id"]})
                continue
            file_ids.add(image["id"])
            images[image["id"]] = {"image_id": image["id"], "root": root, "path": image["file_name"],
                                   **{k: v for k, v in image.items() if k in manifests.OPTIONAL_KEYS}}
        for ann in file_annotations:
            if ann["id"] is not None:
                if ann["id"] in seen_caption_ids:
                    problems["duplicate_caption_id"].append({"file": str(path), "caption_id": ann["id"]})
                    continue
                seen_caption_ids.add(ann["id"])
            if ann["image_id"] not in file_ids:
                problems["caption_for_unknown_image"].append(
                    {"file": str(path), "caption_id": ann["id"], "image_id": ann["image_id"]})
                continue
            normalised = normalize_caption(ann["caption"])
            if not normalised:
                problems["empty_caption"].append({"file": str(path), "caption_id": ann["id"],
                                                  "image_id": ann["image_id"], "caption": ann["caption"]})
                continue
            captions[ann["image_id"]].append((ann["caption"], normalised))
        log.info("read %s: %d images, %d captions", path, len(file_images), len(file_annotations))
    return images, captions


def _inside_root(file_name: str) -> bool:
    """Whether a file_name names a file under its image root: relative, without a '..' component (symbolic
    links inside the root are the dataset's own business)."""
    path = Path(file_name)
    return not path.is_absolute() and not file_name.startswith(("/", "\\")) and ".." not in path.parts


def _usable_records(images: dict, captions: dict, problems, progress_callback) -> list[dict]:
    """The records, sorted by image id, of images that have captions and an image file; the others go to
    `problems`."""
    progress = Progress(len(images), "checking image files", "images", progress_callback)
    usable = []
    for image_id in sorted(images):
        record = images[image_id]
        progress.update()
        if not captions[image_id]:
            problems["image_without_captions"].append({"image_id": image_id, "path": record["path"]})
            continue
        if not _inside_root(record["path"]):
            problems["image_outside_root"].append({"image_id": image_id, "root": record["root"],
                                                   "path": record["path"]})
            continue
        if not os.path.isfile(os.path.join(record["root"], record["path"])):
            problems["missing_image_file"].append({"image_id": image_id, "root": record["root"],
                                                   "path": record["path"]})
            continue
        record["raw_captions"] = [raw for raw, _ in captions[image_id]]
        record["captions"] = [norm for _, norm in captions[image_id]]
        usable.append(record)
    return usable


def make_annotations(outdir: str | os.PathLike, annotation_files, image_roots, karpathy_split=None,
                     val_fraction=0.05, test_fraction=0.05, seed=0, progress_callback=None, previous=None,
                     workspace_root=None) -> dict:
    """Stage 1 entry point: extract_annotations, then write <split>.jsonl for every split and report.json
    into `outdir`. Image roots are written as references that survive a move (storage.manifests.root_reference):
    relative to `workspace_root` when inside it (the demo's), else `images:<k>`, the k-th configured root. `previous`: an earlier annotations output (e.g. last night's), whose split assignment the
    report compares with this one ("split_changes"; the goal is 0 moved images). Returns the report."""
    splits, report = extract_annotations(annotation_files, image_roots, karpathy_split, val_fraction,
                                         test_fraction, seed, progress_callback)
    if not splits["train"]:
        found = ", ".join(f"{n} × {kind}" for kind, n in report["problem_counts"].items() if n) or "no images"
        raise InputError(f"{', '.join(map(str, annotation_files))}: no usable training image ({found}). Fix: check "
                         "that [dataset] images names the folder the file_name entries are relative to, one root "
                         "per annotation file, same order.")
    if workspace_root is not None:
        references = {str(Path(r).expanduser().resolve()): manifests.root_reference(r, k, workspace_root)
                      for k, r in enumerate(image_roots)}
        for records in splits.values():
            for record in records:
                record["root"] = references[record["root"]]
        report["image_roots"] = [references[r] for r in report["image_roots"]]
        report["image_root_paths"] = {references[r]: r for r in references if references[r].startswith("images:")}
        report["annotation_files"] = [portable(r, workspace_root) for r in report["annotation_files"]]
        if karpathy_split:
            report["split_method"] = f"karpathy:{portable(karpathy_split, workspace_root)}"
    report["split_changes"] = {"previous": None}
    if previous is not None:
        current = {r["image_id"]: name for name, records in splits.items() for r in records}
        changes = split_changes(manifests.read_split_assignment(previous), current)
        report["split_changes"] = {"previous": Path(previous).name, **changes}
        (log.warning if changes["moved"] else log.info)(
            "annotations: %d of %d images also in the previous output (%s) changed split",
            changes["moved"], changes["compared_images"], Path(previous).name)
    for name, records in splits.items():
        manifests.write_manifest(manifests.manifest_path(outdir, name), records)
    manifests.write_json(Path(outdir) / manifests.REPORT_FILE, report)
    return report
