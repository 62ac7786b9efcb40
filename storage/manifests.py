"""JSON / JSON Lines artifacts: split manifests, the vocabulary file and stage reports.

A split manifest (`annotations/<fp>/<split>.jsonl`) has one JSON object per line, one line per image:

    {"image_id": 391895, "root": "images:0", "path": "COCO_val2014_000000391895.jpg",
     "captions": ["a man with a red helmet on a small moped on a dirt road"],
     "raw_captions": ["A man with a red helmet on a small moped on a dirt road. "]}

A record may carry more keys after these: the per-image fields a plug-in keeps from the annotation file
(pipeline/extensions.py image_fields; the demo's: what each image shows, and where).

`root` says where the image lies without naming a mount point, so a workspace and its dataset can each move
(another host, another mount): `images:<k>` is the k-th root of the current config's `[dataset] images` (k from
0), a relative path is a directory inside the workspace (the demo's images), and an absolute path (written by
older versions) is itself. `resolve_root` turns any of them into a directory.

`captions` are normalised (see pipeline/annotations.py); `raw_captions` are exactly as in the source file,
in the same order, for evaluation against the original references.

Manifests of a million images are written and read as streams: ManifestWriter writes a record from parts that
are already JSON (the annotations stage keeps captions on disk in a Spool, never decoded twice), iter_manifest
yields records one at a time, and the readers that need only a few keys (iter_locations, iter_captions,
split_assignment) take them from the start of each line as write_manifest and ManifestWriter write it, falling
back to parsing the whole line when it is written otherwise.
"""
from __future__ import annotations

import contextlib
import json
import operator
import os
import re
from pathlib import Path

import numpy as np

from storage.workspace import atomic_file, portable, resolve, write_json

MANIFEST_KEYS = ("image_id", "root", "path", "captions", "raw_captions")
VOCAB_FILE = "vocab.json"
REPORT_FILE = "report.json"
MISSING_FILE = "missing_images.jsonl"   # every image file the annotations named and did not find: {root, path}
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
                ordered = {**{k: record[k] for k in MANIFEST_KEYS if k in record}, **record}
                f.write(json.dumps(ordered, ensure_ascii=False))
                f.write("\n")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """All records of a manifest, in file order."""
    return list(iter_manifest(path))


def iter_manifest(path: str | os.PathLike):
    """The records of a manifest one at a time, in file order."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# `{"image_id": <int>, "root": "<root>", "path": "<path>", "captions": [` — how every manifest line written here
# starts; strings without a backslash are taken as they stand, others are decoded by json
_LOCATION = re.compile(r'\{"image_id": (-?\d+), "root": "([^"\\]*)", "path": "([^"\\]*)", "captions": \[')
_CAPTIONS_END = '], "raw_captions": ['


def iter_locations(path: str | os.PathLike):
    """(image_id, root, path) of every record of a manifest, in file order, without decoding its captions."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            found = _LOCATION.match(line)
            if found:
                yield int(found[1]), found[2], found[3]
            elif line.strip():
                record = json.loads(line)
                yield record["image_id"], record["root"], record["path"]


def iter_captions(path: str | os.PathLike):
    """The normalised captions (a list) of every record of a manifest, in file order. Normalised captions hold
    no quote or backslash, so the list is split where the writers put '", "' between two captions."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            found = _LOCATION.match(line)
            start = found.end() if found else 0
            end = line.find(_CAPTIONS_END, start) if found else -1
            if end == start:
                yield []
                continue
            if end > start and line[start] == line[end - 1] == '"':
                inner = line[start + 1:end - 1]
                captions = inner.split('", "')
                if "\\" not in inner and inner.count('"') == 2 * len(captions) - 2:   # no quote but separators'
                    yield captions
                    continue
            if line.strip():
                yield json.loads(line)["captions"]


def split_assignment(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, sorted; split of each as an index into SPLITS) of an annotations output directory."""
    ids, codes = [], []
    for code, split in enumerate(SPLITS):
        found = np.fromiter((image_id for image_id, _, _ in iter_locations(manifest_path(directory, split))),
                            np.int64)
        ids.append(found)
        codes.append(np.full(len(found), code, np.int8))
    ids, codes = np.concatenate(ids), np.concatenate(codes)
    order = np.argsort(ids, kind="stable")
    return ids[order], codes[order]


def read_split_assignment(directory: str | os.PathLike) -> dict[int, str]:
    """{image id: split} of an annotations output directory (its three manifests)."""
    ids, codes = split_assignment(directory)
    return {image_id: SPLITS[code] for image_id, code in zip(ids.tolist(), codes.tolist())}


def json_string(text: str) -> bytes:
    """`text` as a JSON string, UTF-8, as json.dumps(..., ensure_ascii=False) writes it (a lone surrogate, which
    UTF-8 cannot hold, as a \\u escape)."""
    try:
        return _encode_string(text).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(text).encode("ascii")


_encode_string = json.encoder.encode_basestring   # json's own (C) encoder of strings for ensure_ascii=False


def json_lines(texts: list[str]) -> bytes:
    """Each text as json_string, one a line (a JSON string never holds a raw newline)."""
    if not texts:
        return b""
    try:   # the whole list at once by json's C encoder, a newline between two items
        return json.dumps(texts, ensure_ascii=False, separators=("\n", ":"))[1:-1].encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return b"".join(json_string(text) + b"\n" for text in texts)


class ManifestWriter:
    """A manifest written one record at a time from parts that are JSON already, atomically (the file appears
    when the `with` block ends without an error). Its lines are those write_manifest writes for the same record.

        with ManifestWriter(path) as writer:
            writer.add(391895, b'"images:0"', b'"a.jpg"', b'"a man", "a bike"', b'"A man.", "A bike."')
    """

    def __init__(self, path: str | os.PathLike):
        self.path, self.count = Path(path), 0
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        tmp = self._stack.enter_context(atomic_file(self.path))
        self._file = self._stack.enter_context(open(tmp, "wb", buffering=1 << 20))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def add(self, image_id: int, root: bytes, path: bytes, captions: bytes, raw_captions: bytes,
            extra: bytes = b"") -> None:
        """One record: `root` and `path` JSON strings (json_string), `captions` and `raw_captions` the items of
        each list, JSON strings separated by ', '; `extra` the record's further keys already encoded, starting with
        ', ' (or b'', extra_keys_json)."""
        self._file.write(b'{"image_id": %d, "root": %s, "path": %s, "captions": [%s], "raw_captions": [%s]%s}\n'
                         % (image_id, root, path, captions, raw_captions, extra))
        self.count += 1


def extra_keys_json(fields: dict) -> bytes:
    """A record's keys beyond MANIFEST_KEYS ({key: JSON value}) as ManifestWriter.add's `extra`."""
    return b", " + json.dumps(fields, ensure_ascii=False)[1:-1].encode("utf-8") if fields else b""


class Spool:
    """A scratch file of lines (bytes holding no newline), kept in arrival order and read back in blocks: what the
    annotations stage would otherwise hold in memory for a million images (file names, captions). Deleted by
    its owner with the scratch directory."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.count = Path(path), 0
        self._file = open(self.path, "wb")
        self._pending: list[bytes] = []
        self.add = self._pending.append   # add(line); lines are held until flush() (call it now and then)

    def add_lines(self, lines: bytes, count: int) -> None:
        """`count` lines at once (bytes ending with a newline), after those added before."""
        self.flush()
        self._file.write(lines)
        self.count += count

    def flush(self) -> None:
        if self._pending:
            self._file.write(b"\n".join(self._pending) + b"\n")
            self.count += len(self._pending)
            self._pending.clear()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    def blocks(self, size: int = 1 << 22):
        """Lists of the lines (without their newline), in order, about `size` bytes at a time."""
        self.close()
        yield from _line_blocks(self.path, size)

    def distribute(self, parts: np.ndarray, n_parts: int, directory: str | os.PathLike, name: str) -> list[Path]:
        """Copy each line into the part file `parts[line]` names (`<directory>/<name>-<k>`; −1: left out), in
        arrival order within each part. Returns the part files, k = 0 … n_parts - 1."""
        paths = [Path(directory) / f"{name}-{k}" for k in range(n_parts)]
        with contextlib.ExitStack() as stack:
            outs = [stack.enter_context(open(p, "wb")) for p in paths]
            done = 0
            for lines in self.blocks():
                where = parts[done:done + len(lines)]
                done += len(lines)
                order = np.argsort(where, kind="stable")
                ends = np.searchsorted(where[order], np.arange(n_parts + 1) - 0.5).tolist()   # -1s first
                order = order.tolist()
                for k, out in enumerate(outs):
                    chosen = order[ends[k]:ends[k + 1]]
                    if chosen:
                        out.write(b"\n".join([lines[chosen[0]]] if len(chosen) == 1 else
                                              operator.itemgetter(*chosen)(lines)) + b"\n")
        return paths


class PlanWriter:
    """A feature store's extraction plan (`plans/<name>.json`) written a shard at a time, atomically: the file is
    what write_json(path, {"plan", "shard_size", "shards", "already", "shared_from"}, indent=None) writes, without
    the plan ever being whole in memory. shared_from: {split: [the other splits' shards that hold some of its
    pictures]} (a picture in two splits is planned once).

        with PlanWriter(path, "3f2a…", 1000) as plan:
            plan.add({"name": "shard-3f2a…-train-00000", "split": "train", "images": [[key, id, root, path]]})
            plan.finish({"train": {"stored": 0, "undecodable": 0}, …})
    """

    def __init__(self, path: str | os.PathLike, plan: str, shard_size: int):
        self.path, self.plan, self.shard_size, self._shards = Path(path), plan, shard_size, 0
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        tmp = self._stack.enter_context(atomic_file(self.path))
        self._file = self._stack.enter_context(open(tmp, "w", encoding="utf-8"))
        self._file.write(json.dumps({"plan": self.plan, "shard_size": self.shard_size}, ensure_ascii=False)[:-1]
                         + ', "shards": [')
        return self

    def add(self, shard: dict) -> None:
        self._file.write((", " if self._shards else "") + json.dumps(shard, ensure_ascii=False))
        self._shards += 1

    def finish(self, already: dict, shared_from: dict | None = None) -> None:
        self._file.write(f'], "already": {json.dumps(already, ensure_ascii=False)}, '
                         f'"shared_from": {json.dumps(shared_from or {}, ensure_ascii=False)}}}\n')

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def count_records(path: str | os.PathLike) -> int:
    """The number of records of a manifest (its lines), without decoding them."""
    count = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            count += block.count(b"\n")
    return count


def read_lines(path: str | os.PathLike) -> list[bytes]:
    """Every line of a spool or part file (without newlines), read at once (a part is a few tens of MB)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines[-1]:
        raise ValueError(f"{path}: the last line is not whole")
    lines.pop()
    return lines


def _line_blocks(path, size: int):
    with open(path, "rb") as f:
        rest = b""
        while True:
            block = f.read(size)
            if not block:
                break
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield lines
        if rest:
            yield [rest]


def earlier_outputs(stage_root: str | os.PathLike, current: str | os.PathLike) -> list[Path]:
    """The completed outputs under `stage_root` (directories holding REPORT_FILE) a new `current` may be compared
    with, most recent first: `current` itself when an earlier version of it is there (it is replaced only once
    the new one is written), then its siblings, e.g. last night's annotations output."""
    root, current = Path(stage_root), Path(current)
    whole = lambda d: all((d / name).is_file() for name in (REPORT_FILE, *(f"{s}.jsonl" for s in SPLITS)))
    done = [d for d in root.iterdir() if d.name != current.name and not d.name.startswith(".")   # no temporaries
            and whole(d)] if root.is_dir() else []
    return [current] * whole(current) + sorted(done, key=lambda d: (d / REPORT_FILE).stat().st_mtime_ns, reverse=True)


def write_jsonl(path: str | os.PathLike, records) -> None:
    """One JSON object per line (caption lists of CaptionImages, `captioner caption --out`, the annotations' missing
    images), atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["MANIFEST_KEYS", "VOCAB_FILE", "REPORT_FILE", "MISSING_FILE", "SPLITS", "manifest_path", "write_manifest",
           "read_manifest", "iter_manifest", "iter_locations", "iter_captions", "split_assignment",
           "read_split_assignment", "json_string", "json_lines", "ManifestWriter", "extra_keys_json", "Spool",
           "PlanWriter", "count_records", "read_lines",
           "earlier_outputs", "read_json", "write_json", "write_jsonl", "root_reference", "resolve_root"]
