"""JSON / JSON Lines artifacts: split manifests, the vocabulary file and stage reports.

A split manifest (`annotations/<fp>/<split>.jsonl`) has one JSON object per line, one line per image:

    {"image_id": 391895, "root": "/data/coco/val2014", "path": "COCO_val2014_000000391895.jpg",
     "captions": ["a man with a red helmet on a small moped on a dirt road"],
     "raw_captions": ["A man with a red helmet on a small moped on a dirt road. "]}

Digit datasets (the demo) add `digits`, `digit_boxes` ([x, y, w, h] pixels, left to right), `width` and
`height` (OPTIONAL_KEYS), used only by the digit metrics.

`captions` are normalised (see pipeline/annotations.py); `raw_captions` are exactly as in the source file,
in the same order, for evaluation against the original references.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from storage.workspace import atomic_file, write_json

MANIFEST_KEYS = ("image_id", "root", "path", "captions", "raw_captions")
OPTIONAL_KEYS = ("digits", "digit_boxes", "width", "height")
VOCAB_FILE = "vocab.json"
REPORT_FILE = "report.json"
SPLITS = ("train", "val", "test")


def manifest_path(directory: str | os.PathLike, split: str) -> Path:
    return Path(directory) / f"{split}.jsonl"


def write_manifest(path: str | os.PathLike, records: list[dict]) -> None:
    """Write one JSON line per record, atomically. Records are written in the order given."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps({k: record[k] for k in MANIFEST_KEYS + OPTIONAL_KEYS if k in record},
                                   ensure_ascii=False))
                f.write("\n")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """All records of a manifest, in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_split_assignment(directory: str | os.PathLike) -> dict[int, str]:
    """{image id: split} of an annotations output directory (its three manifests)."""
    return {record["image_id"]: split for split in SPLITS
            for record in read_manifest(manifest_path(directory, split))}


def latest_other_output(stage_root: str | os.PathLike, current: str | os.PathLike) -> Path | None:
    """The most recently completed sibling of `current` under `stage_root` (a directory holding REPORT_FILE),
    e.g. last night's annotations output; None when there is none."""
    root, current = Path(stage_root), Path(current).name
    done = [d for d in root.iterdir() if d.name != current and not d.name.startswith(".")   # no temporaries
            and (d / REPORT_FILE).is_file()] if root.is_dir() else []
    return max(done, key=lambda d: (d / REPORT_FILE).stat().st_mtime_ns, default=None)


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["MANIFEST_KEYS", "OPTIONAL_KEYS", "VOCAB_FILE", "REPORT_FILE", "SPLITS", "manifest_path", "write_manifest",
           "read_manifest", "read_split_assignment", "latest_other_output", "read_json", "write_json"]
