"""Stage 1: COCO caption files (+ optional Karpathy split) → one manifest per split and a report.

Caption normalisation rule (applied to every caption, documented in the README):
  1. Unicode NFKC, typographic apostrophes (’ ‘ ʼ) become ', then lowercase;
  2. every character that is not a letter, a digit or an apostrophe becomes a space
     (so "left-to-right," → "left to right");
  3. an apostrophe survives only between two letters/digits ("man's" stays, "dogs'" → "dogs");
  4. whitespace runs collapse to one space; leading/trailing space is removed.
Tokens are the space-separated words of the normalised caption.

Problems in otherwise well-formed files are counted, listed in the report and skipped — the run goes on:
unknown image ids in captions, images without captions, missing image files, empty captions, duplicate
image or caption ids, images absent from the Karpathy split. A file that is not valid COCO captions JSON
raises InputError naming the file and the field.
"""
from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.progress import Progress
from storage import manifests

log = logging.getLogger("captioner")

SPLITS = manifests.SPLITS
PROBLEM_KINDS = (
    "caption_for_unknown_image",   # annotation whose image_id is not in images[]
    "image_without_captions",      # image with no (non-empty) caption: dropped
    "missing_image_file",          # images[].file_name not found under its image root: dropped
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
    # bool is an int subclass in Python; a JSON true/false is never a valid id.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"{path}: {field}: expected {kind_name}, got {type(value).__name__} {value!r:.60}. "
                         "Fix: this does not look like a COCO captions file (captions_*.json); check the file.")
    return value


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


def load_coco_captions(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Parse and type-check a COCO captions file. Returns (images, annotations) as lists of
    {"id", "file_name"} and {"id" (or None), "image_id", "caption"}. Raises InputError on a bad file."""
    data = _load_json(path, "COCO captions file")
    _expect(path, "top level", data, dict, "a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise InputError(f"{path}: missing key '{key}' at top level. Fix: use a COCO captions file "
                             "(e.g. annotations/captions_train2014.json), not instances_* or another file.")
        _expect(path, key, data[key], list, "a list")
    images = []
    for i, image in enumerate(data["images"]):
        _expect(path, f"images[{i}]", image, dict, "an object")
        for key in ("id", "file_name"):
            if key not in image:
                raise InputError(f"{path}: images[{i}] has no '{key}'. Fix: every image needs 'id' and 'file_name'.")
        images.append({"id": _expect(path, f"images[{i}].id", image["id"], int, "an integer"),
                       "file_name": _expect(path, f"images[{i}].file_name", image["file_name"], str, "a string"),
                       **_digit_metadata(image)})
    annotations = []
    for i, ann in enumerate(data["annotations"]):
        _expect(path, f"annotations[{i}]", ann, dict, "an object")
        for key in ("image_id", "caption"):
            if key not in ann:
                raise InputError(f"{path}: annotations[{i}] has no '{key}'. "
                                 "Fix: every annotation needs 'image_id' and 'caption'.")
        ann_id = ann.get("id")
        if ann_id is not None:
            _expect(path, f"annotations[{i}].id", ann_id, int, "an integer")
        annotations.append({"id": ann_id,
                            "image_id": _expect(path, f"annotations[{i}].image_id", ann["image_id"], int, "an integer"),
                            "caption": _expect(path, f"annotations[{i}].caption", ann["caption"], str, "a string")})
    return images, annotations


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

def split_by_fraction(image_ids, val_fraction: float, test_fraction: float, seed: int) -> dict[int, str]:
    """Seeded split by image: independent of input order (ids are sorted first)."""
    ids = np.array(sorted(set(image_ids)), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = int(round(test_fraction * len(ids)))
    n_val = int(round(val_fraction * len(ids)))
    split_of = {}
    for rank, index in enumerate(order):
        split_of[int(ids[index])] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split_of


# ------------------------------------------------------------------------------------------------ stage

def extract_annotations(annotation_files, image_roots, karpathy_split=None, val_fraction=0.05,
                        test_fraction=0.05, seed=0, progress_callback=None) -> tuple[dict, dict]:
    """Read COCO caption files (with their image roots, same order) and split them by image.

    Returns (splits, report): splits maps 'train'/'val'/'test' to manifest records (sorted by image id),
    report holds counts and every problem found (see PROBLEM_KINDS)."""
    problems = defaultdict(list)
    images = {}          # image id → record
    seen_caption_ids = set()
    captions = defaultdict(list)   # image id → [(raw, normalised)]

    for path, root in zip(annotation_files, image_roots):
        file_images, file_annotations = load_coco_captions(path)
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

    progress = Progress(len(images), "checking image files", "images", progress_callback)
    usable = []
    for image_id in sorted(images):
        record = images[image_id]
        progress.update()
        if not captions[image_id]:
            problems["image_without_captions"].append({"image_id": image_id, "path": record["path"]})
            continue
        if not os.path.isfile(os.path.join(record["root"], record["path"])):
            problems["missing_image_file"].append({"image_id": image_id, "root": record["root"],
                                                   "path": record["path"]})
            continue
        record["raw_captions"] = [raw for raw, _ in captions[image_id]]
        record["captions"] = [norm for _, norm in captions[image_id]]
        usable.append(record)

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


def make_annotations(outdir: str | os.PathLike, annotation_files, image_roots, karpathy_split=None,
                     val_fraction=0.05, test_fraction=0.05, seed=0, progress_callback=None) -> dict:
    """Stage 1 entry point: extract_annotations, then write <split>.jsonl for every split and report.json
    into `outdir`. Returns the report."""
    splits, report = extract_annotations(annotation_files, image_roots, karpathy_split, val_fraction,
                                         test_fraction, seed, progress_callback)
    for name, records in splits.items():
        manifests.write_manifest(manifests.manifest_path(outdir, name), records)
    manifests.write_json(Path(outdir) / manifests.REPORT_FILE, report)
    return report
