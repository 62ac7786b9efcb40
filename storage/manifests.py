"""JSON / JSON Lines artifacts: split manifests, the vocabulary file and stage reports.

A split manifest (`annotations/<fp>/<split>.jsonl`) has one JSON object per line, one line per image:

    {"image_id": 391895, "root": "images:0", "path": "COCO_val2014_000000391895.jpg",
     "captions": ["a man with a red helmet on a small moped on a dirt road"],
     "raw_captions": ["A man with a red helmet on a small moped on a dirt road. "]}

Digit datasets (the demo) add `digits`, `digit_boxes` ([x, y, w, h] pixels, left to right), `width` and
`height` (OPTIONAL_KEYS), used only by the digit metrics.

`root` says where the image lies without naming a mount point, so a workspace and its dataset can each move
(another host, another mount): `images:<k>` is the k-th root of the current config's `[dataset] images` (k from
0), a relative path is a directory inside the workspace (the demo's images), and an absolute path (written by
older versions) is itself. `resolve_root` turns any of them into a directory.

`captions` are normalised (see pipeline/annotations.py); `raw_captions` are exactly as in the source file,
in the same order, for evaluation against the original references.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from storage.workspace import atomic_file, portable, resolve, write_json

MANIFEST_KEYS = ("image_id", "root", "path", "captions", "raw_captions")
OPTIONAL_KEYS = ("digits", "digit_boxes", "width", "height")
VOCAB_FILE = "vocab.json"
REPORT_FILE = "report.json"
SPLITS = ("train", "val", "test")


def root_reference(root: str | os.PathLike, index: int, workspace_root: str | os.PathLike) -> str:
    """How a manifest refers to the image root given as the `index`-th `[dataset] images` entry: relative to the
    workspace when inside it, else `images:<index>`."""
    reference = portable(root, workspace_root)
    return f"images:{index}" if os.path.isabs(reference) else reference


def resolve_root(stored: str, workspace_root: str | os.PathLike, dataset_roots: list[str]) -> Path:
    """The directory a manifest's `root` names now: `images:<k>` through `dataset_roots` (the current config's
    `[dataset] images`), a relative path inside `workspace_root`. Raises ValueError naming the fix when the
    config has fewer roots than the manifest refers to."""
    if stored.startswith("images:"):
        k = int(stored.split(":", 1)[1])
        if k >= len(dataset_roots):
            raise ValueError(f"the annotations refer to image root {stored} (entry {k + 1} of [dataset] images), "
                             f"but the config lists {len(dataset_roots)}. Fix: list the image roots again, one per "
                             "annotation file, same order.")
        return Path(dataset_roots[k]).expanduser()
    return resolve(stored, workspace_root)


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


def write_jsonl(path: str | os.PathLike, records) -> None:
    """One JSON object per line (caption lists of CaptionImages and `captioner caption --out`), atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["MANIFEST_KEYS", "OPTIONAL_KEYS", "VOCAB_FILE", "REPORT_FILE", "SPLITS", "manifest_path", "write_manifest",
           "read_manifest", "read_split_assignment", "latest_other_output", "read_json", "write_json", "write_jsonl", "root_reference", "resolve_root"]
