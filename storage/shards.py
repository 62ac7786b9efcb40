"""HDF5 feature shards (schema version 2): the atomic writer, the checks, the readers.

One shard = one HDF5 file `shard-<plan>-<split>-<k>.h5` in the store directory `features/<encoder-fp>/`:

    features    float16 (n, P, D)   encoder output per image, P = positions (row-major; at 299 px 64 = 8×8 for
                                    mixed10, 289 = 17×17 for mixed7), D = channels (2048, 768: attrs "layer");
                                    chunks (1, P, D): one image per chunk, each with a
                                    fletcher32 checksum (HDF5 refuses to return a damaged chunk)
    contents    utf-8 str (n,)      each row's content key: the sha256 of the image file's bytes
                                    (storage/contents.py). The store finds features by this key only.
    image_ids   int64 (n,)          the dataset's id of the image each row was extracted for (informational:
                                    another dataset may use the row under another id)
    paths       utf-8 str (n,)      image path relative to its image root
    skipped     utf-8 str (k, 2)    (path, reason) of images that could not be decoded
    skipped_ids int64 (k,)          their image ids
    skipped_contents utf-8 str (k,) their content keys
    attrs       schema_version, encoder, weights, weights_sha256 | seed, image_size, preprocess, dtype,
                fingerprint (encoder), created_at, software, split, plan, n_rows, n_skipped,
                features_sha256 (of the float16 bytes in row order), complete

A shard is written under a `.tmp-` name in the store directory and renamed when closed, so a shard that exists
under its final name was written whole. `check_shard` catches what can still go wrong afterwards (truncation,
overwritten bytes): quick checks on open, and the full features checksum with deep=True.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from storage.workspace import TEMP_PREFIX, atomic_file, resolve

SCHEMA_VERSION = 2   # rows keyed by content (`contents`)
SHARD_GLOB = "shard-*.h5"
STRING = h5py.string_dtype("utf-8")
REQUIRED_DATASETS = ("features", "contents", "image_ids", "paths", "skipped", "skipped_ids", "skipped_contents")


def create_hdf5(path) -> h5py.File:
    """A new HDF5 file for writing, as the writers of shards and attention maps open one.

    v110: compact chunk indexes (~50 bytes per image instead of ~100), readable by HDF5 >= 1.10.
    No chunk cache (rdcc_nbytes=0): every chunk we write is whole, so the cache only delays it. And HDF5 1.14
    cannot recover from a write that fails with a chunk still in its cache: closing the file then fails, leaves
    the dataset's handle half-closed, and freeing that handle crashed the process (SIGSEGV in
    H5VL_set_vol_wrapper, where a full disk should fail with a message; tests/test_operations.py,
    test_a_full_disk_fails_clearly_and_leaves_nothing_complete_looking). Without the cache a failed write leaves
    nothing behind in it, and the file closes or fails cleanly."""
    return h5py.File(path, "w", libver=("v110", "latest"), rdcc_nbytes=0)


class ShardWriter:
    """Append rows to a new shard; the file appears under its final name only on close() without error.

        with ShardWriter(path, positions=64, channels=2048, attrs={...}) as shard:
            shard.append(contents, ids, paths, features)   # features float16-convertible (k, P, D)
            shard.skip(content, image_id, path, reason)
    """

    def __init__(self, path, positions: int, channels: int, attrs: dict, compression: str | None = None):
        self.path = Path(path)
        self.attrs = attrs
        self._atomic = atomic_file(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._file = create_hdf5(self._tmp)
            options = {"compression": compression} if compression else {}
            self._features = self._file.create_dataset(
                "features", shape=(0, positions, channels), maxshape=(None, positions, channels),
                dtype=np.float16, chunks=(1, positions, channels), fletcher32=True, **options)
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._contents, self._ids, self._paths, self._skipped = [], [], [], []
        self._digest = hashlib.sha256()

    def append(self, contents, image_ids, paths, features) -> None:
        features = np.ascontiguousarray(features, dtype=np.float16)
        n, start = len(image_ids), self._features.shape[0]
        if features.shape[0] != n or features.shape[1:] != self._features.shape[1:]:
            raise ValueError(f"features {features.shape} do not match {n} rows of {self._features.shape[1:]}")
        self._features.resize(start + n, axis=0)
        self._features[start:start + n] = features
        self._digest.update(features.tobytes())
        self._contents.extend(contents)
        self._ids.extend(int(i) for i in image_ids)
        self._paths.extend(paths)

    def skip(self, content: str, image_id: int, path: str, reason: str) -> None:
        self._skipped.append((int(image_id), path, reason, content))

    @property
    def n_rows(self) -> int:
        return len(self._ids)

    @property
    def n_skipped(self) -> int:
        return len(self._skipped)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        error = exc
        if error is None:
            try:
                self._finish()
            except BaseException as e:
                error = e
        try:
            self._file.close()   # once: after a failed write (a full disk) closing again cannot succeed
        except BaseException as e:
            error = error or e   # the first error is the one to report: a failed close follows from it
        if error is None:
            return self._atomic.__exit__(None, None, None)
        self._atomic.__exit__(type(error), error, error.__traceback__)   # removes the temporary
        if error is not exc:
            raise error
        return False

    def _finish(self) -> None:
        f = self._file
        f.create_dataset("contents", data=np.asarray(self._contents, dtype=object), dtype=STRING)
        f.create_dataset("image_ids", data=np.asarray(self._ids, dtype=np.int64))
        f.create_dataset("paths", data=np.asarray(self._paths, dtype=object), dtype=STRING)
        skipped = np.asarray([[p, r] for _, p, r, _ in self._skipped], dtype=object).reshape(-1, 2)
        f.create_dataset("skipped", data=skipped, dtype=STRING)
        f.create_dataset("skipped_ids", data=np.asarray([i for i, _, _, _ in self._skipped], dtype=np.int64))
        f.create_dataset("skipped_contents", data=np.asarray([c for *_, c in self._skipped], dtype=object),
                         dtype=STRING)
        for key, value in self.attrs.items():
            f.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        f.attrs.update({
            "schema_version": SCHEMA_VERSION, "dtype": "float16",
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "n_rows": len(self._ids), "n_skipped": len(self._skipped),
            "features_sha256": self._digest.hexdigest(), "complete": True})


def list_shards(store_dir) -> list[Path]:
    """Finished shards of a store (temporaries excluded), sorted by name."""
    store = Path(store_dir)
    return sorted(p for p in store.glob(SHARD_GLOB) if not p.name.startswith(TEMP_PREFIX)) if store.is_dir() else []


def check_shard(path, deep: bool = False) -> list[str]:
    """Problems with a shard; [] when it is usable. Quick checks always (opens, schema, attrs, row counts);
    deep=True also reads every feature: finite values and the recorded checksum."""
    try:
        with h5py.File(path, "r") as f:
            missing = [name for name in REQUIRED_DATASETS if name not in f]
            if missing:
                return [f"missing datasets {missing}"]
            attrs = f.attrs
            if not attrs.get("complete", False):
                return ["not marked complete"]
            if attrs.get("schema_version") != SCHEMA_VERSION:
                return [f"schema_version {attrs.get('schema_version')} != {SCHEMA_VERSION}"]
            n = int(attrs["n_rows"])
            problems = [f"{name} has {f[name].shape[0]} rows, attrs say {n}"
                        for name in ("features", "contents", "image_ids", "paths") if f[name].shape[0] != n]
            if f["features"].dtype != np.float16:
                problems.append(f"features dtype {f['features'].dtype}, expected float16")
            if problems or not deep:
                return problems
            digest, finite = hashlib.sha256(), True
            for start in range(0, n, 256):
                try:
                    block = f["features"][start:start + 256]
                except OSError as e:   # HDF5's per-chunk fletcher32 checksum refused a damaged chunk
                    problems.append(f"features rows {start}-{min(start + 256, n) - 1} damaged: chunk checksum "
                                    f"(fletcher32) failed ({e})")
                    continue
                digest.update(np.ascontiguousarray(block).tobytes())
                finite &= bool(np.isfinite(block).all())
            if not problems and digest.hexdigest() != attrs["features_sha256"]:
                problems.append("features checksum mismatch (bytes changed after writing)")
            if not finite:
                problems.append("features contain NaN or Inf")
            return problems
    except Exception as e:   # truncated or overwritten files fail inside HDF5 with many exception types
        return [f"cannot read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip()]


def read_ids(path) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids int64 (n,), skipped_ids int64 (k,)) of one shard."""
    with h5py.File(path, "r") as f:
        return f["image_ids"][:], f["skipped_ids"][:]


def read_contents(path) -> list[str]:
    """The content key of each row of one shard."""
    with h5py.File(path, "r") as f:
        return list(f["contents"].asstr()[:])


def read_skipped(path) -> list[tuple[int, str, str, str]]:
    """[(image_id, path, reason, content key)] of the images a shard could not decode."""
    with h5py.File(path, "r") as f:
        pairs = f["skipped"].asstr()[:] if len(f["skipped"]) else []
        contents = f["skipped_contents"].asstr()[:] if len(f["skipped_contents"]) else []
        return [(int(i), p, r, c) for i, (p, r), c in zip(f["skipped_ids"][:], pairs, contents)]


def read_attrs(path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


def feature_shape(path) -> tuple[int, int]:
    """(positions, channels) of a shard's feature rows."""
    with h5py.File(path, "r") as f:
        return tuple(int(n) for n in f["features"].shape[1:])


def read_rows(path, start: int, stop: int) -> np.ndarray:
    """features[start:stop] of a shard, float16 (stop - start, P, D): one contiguous block read."""
    with h5py.File(path, "r") as f:
        return f["features"][start:stop]


def store_contents(store_dir, paths=None) -> tuple[dict, dict, list]:
    """What a store holds (or only its shards `paths`): ({content key: (shard name, row)}, {content key: (shard
    name, reason)}, bad shards).

    Shards failing the quick check are listed as bad and their images count as absent, so the pipeline
    re-extracts them. Content in two shards (two overlapping plans) resolves to the first shard by name."""
    rows, skipped, bad = {}, {}, []
    for path in sorted(paths) if paths is not None else list_shards(store_dir):
        if check_shard(path):
            bad.append(path)
            continue
        for row, content in enumerate(read_contents(path)):
            rows.setdefault(content, (path.stem, row))
        for _, _, reason, content in read_skipped(path):
            skipped.setdefault(content, (path.stem, reason))
    return rows, skipped, bad


class Moments:
    """Streaming mean and standard deviation per column, in float64: add() blocks of rows (n, D)."""

    def __init__(self):
        self.count, self.total, self.total_sq = 0, 0.0, 0.0

    def add(self, rows) -> None:
        rows = np.asarray(rows, np.float64)
        self.count += len(rows)
        self.total = self.total + rows.sum(0)
        self.total_sq = self.total_sq + (rows ** 2).sum(0)

    def mean(self) -> np.ndarray:
        return np.asarray(self.total / max(self.count, 1))

    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.total_sq / max(self.count, 1) - self.mean() ** 2, 0.0))


def describe_shard(path, stats: bool = False) -> dict:
    """Everything `captioner inspect` shows of one shard; stats=True adds mean/std/zero fraction/non-finite
    counts of the features, computed in blocks of rows."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        feats = f["features"]
        info = {
            "path": str(path), "bytes": path.stat().st_size, "rows": int(feats.shape[0]),
            "shape": list(feats.shape), "dtype": str(feats.dtype), "chunks": list(feats.chunks or []),
            "compression": feats.compression or "none",
            "bytes_per_image": round(path.stat().st_size / max(int(feats.shape[0]), 1)),
            "attrs": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()},
            "skipped": [{"image_id": i, "path": p, "reason": r, "content": c} for i, p, r, c in read_skipped(path)],
        }
        if stats:
            moments, zeros, nonfinite = Moments(), 0, 0
            for start in range(0, feats.shape[0], 256):
                block = feats[start:start + 256].astype(np.float64)
                finite = np.isfinite(block)
                nonfinite += int((~finite).sum())
                block = np.where(finite, block, 0.0)
                moments.add(block.reshape(-1, 1))
                zeros += int((block == 0).sum())
            info["stats"] = {"mean": float(moments.mean()[0]) if moments.count else 0.0,
                             "std": float(moments.std()[0]) if moments.count else 0.0,
                             "zero_fraction": zeros / max(moments.count, 1), "nonfinite": nonfinite}
    return info


def find_image(path, image_id: int | None = None, content: str | None = None) -> int | None:
    """Row of an image in a shard, by the id it was extracted for or by its content key; None when absent."""
    if content is not None:
        contents = read_contents(path)
        return contents.index(content) if content in contents else None
    ids, _ = read_ids(path)
    rows = np.flatnonzero(ids == image_id)
    return int(rows[0]) if len(rows) else None


# ----------------------------------------------------------------- attention maps of generated captions
#   image_ids int64 (n,), paths utf-8 (n,) image paths `<root reference>/<path>` (storage.manifests): relative to
#   the workspace holding the file (it lies in <workspace>/captions/<fp>/) for images inside it, `images:<k>/...`
#   for the k-th configured image root (attrs["image_roots"]: the roots when the file was written); tokens int32 (n, T) (0 = padding),
#   attention float16 (n, T, P): the weights over the P positions when each word was chosen.
#   attrs["layer"]: the InceptionV3 layer whose grid the positions are (pipeline.encoder.LAYERS); files written
#   before it was recorded are mixed10's.


def _image_path(attention_file, stored: str, dataset_roots: list[str]) -> str:
    """A stored image path, `<root reference>/<path>` (storage.manifests): `images:<k>/...` through
    `dataset_roots`, a relative path against the workspace the attention file is in now (it may have moved)."""
    from storage.manifests import resolve_root

    if stored.startswith("images:"):
        root, _, rest = stored.partition("/")
        return str(resolve_root(root, ".", dataset_roots) / rest)
    return str(resolve(stored, Path(attention_file).resolve().parents[2]))


def _dataset_roots(f, dataset_roots) -> list[str]:
    """The image roots `images:<k>` resolves through: the caller's (the current config's), else those recorded
    when the file was written."""
    return list(dataset_roots) if dataset_roots else json.loads(f.attrs.get("image_roots", "[]"))

def write_attention(path, image_ids, paths, tokens, attention, attrs: dict) -> None:
    """Write the attention-maps file atomically."""
    with atomic_file(path, suffix=".h5") as tmp:
        with create_hdf5(tmp) as f:
            f.create_dataset("image_ids", data=np.asarray(image_ids, np.int64))
            f.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=STRING)
            f.create_dataset("tokens", data=np.asarray(tokens, np.int32))
            attention = np.asarray(attention, np.float16)
            f.create_dataset("attention", data=attention, compression="gzip" if len(attention) else None,
                             chunks=(1,) + attention.shape[1:] if len(attention) else None)
            for key, value in attrs.items():
                f.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)


def read_attention(path, image_id: int, dataset_roots=None) -> dict:
    """{"path", "tokens" (T,), "attention" (T, P) float32, "layer"} of one image from an attention-maps file;
    image paths of `images:<k>` roots resolve through `dataset_roots` (the current [dataset] images), else the
    recorded ones."""
    with h5py.File(path, "r") as f:
        rows = np.flatnonzero(f["image_ids"][:] == image_id)
        if not len(rows):
            raise KeyError(image_id)
        row = int(rows[0])
        return {"path": _image_path(path, f["paths"].asstr()[row], _dataset_roots(f, dataset_roots)),
                "tokens": f["tokens"][row],
                "attention": f["attention"][row].astype(np.float32), "layer": _layer(f)}


def read_all_attention(path, dataset_roots=None) -> dict:
    """The whole attention-maps file in one read: {"image_ids" (n,), "paths" [str], "tokens" (n, T),
    "attention" (n, T, P) float16 as stored, "layer"} (for evaluation, which needs every image's maps)."""
    with h5py.File(path, "r") as f:
        roots = _dataset_roots(f, dataset_roots)
        return {"image_ids": f["image_ids"][:], "paths": [_image_path(path, p, roots) for p in f["paths"].asstr()[:]],
                "tokens": f["tokens"][:],
                "attention": f["attention"][:], "layer": _layer(f)}


def _layer(f) -> str:
    return str(f.attrs.get("layer", "mixed10"))
