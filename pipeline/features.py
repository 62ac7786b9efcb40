"""Feature extraction into the HDF5 store: plan shards for images not yet stored, extract one shard, index a split.

The store `features/<encoder-fp>/` is keyed by image CONTENT (the sha256 of the file's bytes, storage/contents.py),
never by a dataset's image id, so datasets share one store safely and the same picture is extracted once:
  identify_split   the content key of every image of a split (a file is read only when it is new or changed
                   since the last run); the split index also records a digest of the files' sizes and mtimes
                   (pipeline/listing.py), so a replaced file is noticed;
  plan_shards      assigns every content the store neither holds nor records as undecodable to new shards of at
                   most `shard_size` images, one split per shard;
  extract_shard    decodes images in threads ahead of a compiled InceptionV3 forward pass, writes one shard;
  index_split      maps every image of a split to (shard, row) through its content key, lists skipped images,
                   and fails loudly if an image has no features (so training never silently loses data).
A nightly rerun with grown annotations plans only the new images; an unchanged rerun plans nothing; an image
replaced under its file name has a new key and is extracted again.
"""
from __future__ import annotations

import errno
import logging
import shutil
import sys
import time
from array import array
from pathlib import Path

import numpy as np

from pipeline import encoder as encoder_lib, images, listing, splits
from pipeline.errors import InputError
from pipeline.progress import Progress
from storage import contents, manifests, shards, workspace

log = logging.getLogger("captioner")

_encoders: dict = {}   # (weights identity, image size) → compiled forward function, one per worker process


def _identified(annotations_dir, split: str, image_root, cache, progress_callback=None):
    """(image_id, root reference, path, content key) of each image of a split, in manifest order; the keys come
    from the cache a batch at a time (storage.contents.ContentCache.keys). Logs files/s and ETA."""
    total = manifests.count_records(manifests.manifest_path(annotations_dir, split))
    progress = Progress(total, f"identifying {split} images", "files", progress_callback)
    for batch in listing.batches(listing.split_files(annotations_dir, split, image_root)):
        for (image_id, root, path, _), key in zip(batch, cache.keys([item[3] for item in batch])):
            yield image_id, root, path, key
        progress.update(len(batch))


def identify_split(annotations_dir, split: str, image_root, cache, progress_callback=None) -> dict[int, str]:
    """{image_id: content key} of a split; cache: storage.contents.ContentCache (files unchanged since they were
    last hashed are not read again)."""
    return {image_id: key for image_id, _, _, key in
            _identified(annotations_dir, split, image_root, cache, progress_callback)}


def classify_split(annotations_dir, store_dir, split: str, keys: dict[int, str]) -> dict:
    """Sort the images of `split` by what the store has for their content keys (`keys`: identify_split):
    {"stored": {id: (shard, row)}, "undecodable": {id: (record, shard, reason)}, "missing": [record],
    "bad": [damaged shard paths]}, records holding image_id, root and path. Images of shards that fail their
    quick check count as missing, so they are extracted again."""
    rows, skipped, bad = shards.store_contents(store_dir)
    out = {"stored": {}, "undecodable": {}, "missing": [], "bad": bad}
    for image_id, root, path in manifests.iter_locations(manifests.manifest_path(annotations_dir, split)):
        key = keys[image_id]
        if key in rows:
            out["stored"][image_id] = rows[key]
        elif key in skipped:
            out["undecodable"][image_id] = ({"image_id": image_id, "root": root, "path": path}, *skipped[key])
        else:
            out["missing"].append({"image_id": image_id, "root": root, "path": path})
    return out


def images_to_extract(annotations_dir, store_dir, split: str, keys: dict[int, str]) -> tuple[list, dict]:
    """Contents of `split` that the store neither holds nor records as undecodable, each once:
    ([[content key, image_id, root, path]], counts)."""
    found = classify_split(annotations_dir, store_dir, split, keys)
    for path in found["bad"]:
        log.warning("store: %s fails its check and is not used; its images are extracted again", path.name)
    todo, seen = [], set()
    for r in found["missing"]:
        key = keys[r["image_id"]]
        if key not in seen:
            seen.add(key)
            todo.append([key, r["image_id"], r["root"], r["path"]])
    return todo, {"stored": len(found["stored"]), "undecodable": len(found["undecodable"])}


def shard_name(plan_name: str, split: str, k: int) -> str:
    """The k-th shard of a plan's split: 'shard-<plan>-<split>-<k>' (plan_of reads the plan back)."""
    return f"shard-{plan_name}-{split}-{k:05d}"


def plan_shards(plan_name: str, todo_by_split: dict, shard_size: int) -> dict:
    """Group images into shards of at most `shard_size`, one split per shard, in the order given:
    {"plan", "shard_size", "shards": [{"name", "split", "images": [[content key, image_id, root, path], ...]}]}."""
    plan = {"plan": plan_name, "shard_size": shard_size, "shards": []}
    for split, todo in todo_by_split.items():
        for k, start in enumerate(range(0, len(todo), shard_size)):
            plan["shards"].append({"name": shard_name(plan_name, split, k), "split": split,
                                   "images": todo[start:start + shard_size]})
    n_new = sum(len(s["images"]) for s in plan["shards"])
    log.info("feature plan %s: %d images to extract in %d shards", plan_name, n_new, len(plan["shards"]))
    return plan


def _first_free(store_dir, plan_name: str, split: str) -> int:
    """The first shard number of a plan's split that no shard file has: a plan written again under its name (its
    annotations recomputed as image files came or went) never reuses a name whose file holds other images."""
    taken = [int(p.stem.rsplit("-", 1)[1]) for p in Path(store_dir).glob(f"shard-{plan_name}-{split}-*.h5")]
    return max(taken, default=-1) + 1


def plan_store(annotations_dir, store_dir, shard_size: int, plan_name: str, image_root, cache, out_path,
               progress_callback=None) -> dict:
    """Write the extraction plan for every split of an annotation version to `out_path` (plan_shards' layout,
    with "already": what the store holds of each split): only contents the store lacks, each once (a picture in
    two splits is extracted for the first, and logged: shared_pictures). The splits' images are identified through
    `cache` (storage.contents.ContentCache) and planned as they are read, a shard written as soon as it is full.
    Returns {"images", "shards", "already", "shared_pictures"}."""
    rows, skipped, bad = shards.store_contents(store_dir)
    for path in bad:
        log.warning("store: %s fails its check and is not used; its images are extracted again", path.name)
    counts, planned, n_shards, seen = {}, {}, 0, {s: (array("Q"), array("q")) for s in manifests.SPLITS}
    shared_from = {s: set() for s in manifests.SPLITS}   # the other splits' shards a split's pictures are planned in
    with manifests.PlanWriter(out_path, plan_name, shard_size) as plan:
        for split in manifests.SPLITS:
            counts[split], todo, k = {"stored": 0, "undecodable": 0}, [], _first_free(store_dir, plan_name, split)
            name = shard_name(plan_name, split, k)
            for image_id, root, path, key in _identified(annotations_dir, split, image_root, cache,
                                                          progress_callback):
                if not key.startswith(contents.MISSING_PREFIX):
                    seen[split][0].append(int(key[:16], 16))
                    seen[split][1].append(image_id)
                if key in rows or key in skipped:
                    counts[split]["stored" if key in rows else "undecodable"] += 1
                elif key not in planned:
                    planned[key] = name
                    todo.append([key, image_id, root, path])
                elif not planned[key].startswith(f"shard-{plan_name}-{split}-"):
                    shared_from[split].add(planned[key])
                if len(todo) == shard_size:
                    plan.add({"name": name, "split": split, "images": todo})
                    todo, k, n_shards = [], k + 1, n_shards + 1
                    name = shard_name(plan_name, split, k)
            if todo:
                plan.add({"name": name, "split": split, "images": todo})
                n_shards += 1
        plan.finish(counts, {s: sorted(others) for s, others in shared_from.items() if others})
    log.info("store already holds: %s", ", ".join(f"{s} {c['stored']} (+{c['undecodable']} undecodable)"
                                                 for s, c in counts.items()))
    log.info("feature plan %s: %d images to extract in %d shards", plan_name, len(planned), n_shards)
    return {"images": len(planned), "shards": n_shards, "already": counts,
            "shared_pictures": splits.shared_pictures(seen)}


def note_older_stores(store_dir) -> None:
    """Log the stores beside a new, empty one whose shards an older schema wrote (rows keyed by dataset image id):
    they are not read, and this store extracts their images again, once."""
    store_dir = Path(store_dir)
    if shards.list_shards(store_dir) or not store_dir.parent.is_dir():
        return
    for other in sorted(p for p in store_dir.parent.iterdir() if p.is_dir() and p != store_dir):
        first = next(iter(shards.list_shards(other)), None)
        try:
            version = shards.read_attrs(first).get("schema_version") if first else shards.SCHEMA_VERSION
        except Exception:   # a damaged shard says nothing about its store
            continue
        if version != shards.SCHEMA_VERSION:
            log.warning("features/%s was written with shard schema %s (rows keyed by dataset image id) and is not "
                        "used: store %s keys rows by image content, so these images are extracted again, once. "
                        "Delete %s to free its space.", other.name, version, store_dir.name, other)


def software_versions() -> dict:
    from importlib.metadata import version

    import keras
    import PIL
    import tensorflow as tf
    return {"python": sys.version.split()[0], "tensorflow": tf.__version__, "keras": keras.__version__,
            "h5py": version("h5py"), "numpy": np.__version__, "pillow": PIL.__version__}


def encoder_forward(identity: dict, image_size: int, layer: str = encoder_lib.DEFAULT_LAYER,
                    precision: str = "float32"):
    """A compiled uint8 (B, S, S, 3) → float16 (B, P, D) function, built once per process and setting;
    precision: the forward pass's compute precision (pipeline.encoder.PRECISIONS)."""
    key = (tuple(sorted(identity.items())), image_size, layer, precision)
    if key not in _encoders:
        import tensorflow as tf
        model = encoder_lib.build_encoder(identity, image_size, layer, precision)

        @tf.function(input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.uint8)])
        def forward(batch):
            return tf.cast(model(batch, training=False), tf.float16)

        _encoders[key] = forward
    return _encoders[key]


def extract_shard(out_path, image_list, identity: dict, image_size: int, batch_size: int, attrs: dict,
                  compression: str | None = None, workers: int | None = None, progress_callback=None,
                  layer: str = encoder_lib.DEFAULT_LAYER, precision: str = "float32") -> dict:
    """Extract features of `image_list` ([[content key, image_id, root, path], ...]) into the shard `out_path`.
    Undecodable images are recorded in the shard's `skipped` dataset, never stored as zeros. The encoder's
    provenance (weights identity, image size, preprocessing, software versions) goes into the attrs, plus
    `attrs` given by the caller (store fingerprint, split, plan). compression: gzip, lzf, or none / None.
    layer: the InceptionV3 layer the features come from (pipeline.encoder.layer_spec); precision: the forward pass's
    (pipeline.encoder.PRECISIONS), recorded in the attrs."""
    compression = None if compression in (None, "none") else compression
    forward = encoder_forward(identity, image_size, layer, precision)
    shape = encoder_lib.grid_size(image_size, layer) ** 2, encoder_lib.layer_spec(layer)["channels"]
    name = Path(out_path).stem
    progress = Progress(len(image_list), name, "images", progress_callback)
    items = [((key, image_id, rel), str(Path(root) / rel)) for key, image_id, root, rel in image_list]
    if encoder_lib.extra_of(layer) is not None:   # the file the last channels are computed with
        attrs = {"extra_sha256": workspace.file_sha256(encoder_lib.extra_of(layer).file(identity)), **attrs}
    attrs = {**encoder_lib.weights_attrs(identity), "encoder": encoder_lib.encoder_name(layer), "layer": layer,
             "image_size": image_size, "preprocess": encoder_lib.PREPROCESS, "precision": precision,
             "software": software_versions(), **attrs}
    start = time.monotonic()
    try:
        summary = _write_shard(out_path, items, forward, image_size, batch_size, workers, shape, attrs,
                               compression, progress)
    except (OSError, RuntimeError) as e:   # HDF5 reports some failed writes as RuntimeError (failed closes)
        free = shutil.disk_usage(Path(out_path).parent).free
        code = getattr(e, "errno", None)
        if code in (errno.ENOSPC, errno.EFBIG) or "No space left" in str(e) or "too large" in str(e).lower():
            raise OSError(code or errno.ENOSPC,
                          f"writing {out_path}: the filesystem is full or the file size limit was hit "
                          f"({free:,} bytes free there). Nothing complete-looking was left behind. Fix: free "
                          f"space or point [workspace] root at a larger filesystem, then rerun") from e
        raise
    summary["seconds"] = round(time.monotonic() - start, 3)
    summary["images_per_second"] = round(len(image_list) / max(summary["seconds"], 1e-9), 2)
    log.info("%s: %d rows, %d skipped, %.1f images/s", name, summary["rows"], summary["skipped"],
             summary["images_per_second"])
    return summary


def extract_planned_shard(store_dir, plan_name: str, shard: str, image_root, options: dict,
                          progress_callback=None) -> dict:
    """Extract the shard `shard` of the plan `plans/<plan_name>.json` of the store into `<shard>.h5`.
    image_root(reference) → the directory a manifest root reference names; options: extract_shard's identity,
    image_size, batch_size, compression and workers."""
    store_dir = Path(store_dir)
    plan = manifests.read_json(store_dir / "plans" / f"{plan_name}.json")
    entry = next(s for s in plan["shards"] if s["name"] == shard)
    roots = {root: str(image_root(root)) for root in {root for _, _, root, _ in entry["images"]}}
    images = [[key, i, roots[root], rel] for key, i, root, rel in entry["images"]]
    attrs = {"fingerprint": store_dir.name, "split": entry["split"], "plan": plan_name}
    return extract_shard(store_dir / f"{shard}.h5", images, attrs=attrs, progress_callback=progress_callback,
                         **options)


def plan_repair(annotations_dir, store_dir, split: str, shard_size: int, keys: dict[int, str]) -> dict | None:
    """A plan for the images of `split` whose contents the store lacks although the plan was made (a shard was
    damaged or deleted since, or an image file was replaced), written to the store's plans/ as
    `repair-<fp>.json`; None when nothing is lacking."""
    todo, _ = images_to_extract(annotations_dir, store_dir, split, keys)
    if not todo:
        return None
    name = "repair-" + workspace.fingerprint("repair", {"images": [key for key, *_ in todo]})
    repair = plan_shards(name, {split: todo}, shard_size)
    manifests.write_json(Path(store_dir) / "plans" / f"{name}.json", repair, indent=None)
    return repair


def _write_shard(out_path, items, forward, image_size, batch_size, workers, shape, attrs, compression,
                 progress) -> dict:
    with shards.ShardWriter(out_path, *shape, attrs, compression) as writer:
        for keys, batch, failures in images.iter_batches(items, image_size, batch_size, workers=workers):
            if len(keys):
                features = forward(batch).numpy()
                writer.append([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], features)
            for (key, image_id, rel), path, reason in failures:
                log.warning("skipped image %d %s: %s", image_id, path, reason)
                writer.skip(key, image_id, rel, reason)
            progress.update(len(keys) + len(failures))
    return {"rows": writer.n_rows, "skipped": writer.n_skipped}


def index_split(annotations_dir, store_dir, split: str, keys: dict[int, str]) -> dict:
    """{"images": {image_id: [shard, row]}, "contents": {image_id: content key}, "skipped": {image_id: {path,
    shard, reason}}, "shards", "split"} for every image of `split`. Raises InputError when an image is neither
    stored nor skipped (a shard is missing or damaged)."""
    found = classify_split(annotations_dir, store_dir, split, keys)
    index = {str(i): list(place) for i, place in found["stored"].items()}
    skipped_here = {str(i): {"path": r["path"], "shard": shard, "reason": reason}
                    for i, (r, shard, reason) in found["undecodable"].items()}
    missing = [r["image_id"] for r in found["missing"]]
    if missing:
        raise InputError(f"{store_dir}: {len(missing)} images of split {split} have no features "
                         f"(first: {missing[:5]}; damaged shards: {[p.name for p in found['bad']]}). "
                         "Fix: rerun the pipeline; it re-extracts missing or damaged shards.")
    if skipped_here:
        log.warning("split %s: %d images could not be decoded and are left out (reasons in the index and "
                    "the shards' 'skipped' datasets)", split, len(skipped_here))
    log.info("split %s: %d images with features in %d shards", split, len(index),
             len({shard for shard, _ in index.values()}))
    return {"split": split, "images": index, "skipped": skipped_here,
            "contents": {str(i): keys[i] for i in (*found["stored"], *found["undecodable"])},
            "shards": sorted({shard for shard, _ in index.values()})}


def quarantine_damaged(store_dir, indexes: list[dict]) -> list[str]:
    """Deep-check every shard the split indexes use; move damaged ones aside (`.damaged-<time>-<name>`, kept
    for inspection, invisible to the pipeline). Returns the names of the shards moved aside."""
    store_dir = Path(store_dir)
    damaged = []
    for name in sorted({shard for index in indexes for shard in index["shards"]}):
        path = store_dir / f"{name}.h5"
        found = shards.check_shard(path, deep=True) if path.exists() else ["missing"]
        if found:
            damaged.append(name)
            if path.exists():
                path.rename(store_dir / f".damaged-{time.strftime('%Y%m%dT%H%M%S')}-{path.name}")
            log.error("shard %s is damaged (%s): moved aside and extracted again", path.name, "; ".join(found))
    return damaged


def rows_changed(store_dir, shard_name: str, indexes: list[dict]) -> int:
    """How many images the split indexes place in `shard_name` at a row that now holds other content."""
    held = shards.read_contents(Path(store_dir) / f"{shard_name}.h5")
    return sum(1 for index in indexes for image_id, (shard, row) in index["images"].items()
               if shard == shard_name and (row >= len(held) or held[row] != index["contents"][image_id]))


def plan_of(shard_name: str) -> str:
    """'shard-<plan>-<split>-<k>' → '<plan>' (plans named repair-<fp> contain a dash too)."""
    return shard_name[len("shard-"):].rsplit("-", 2)[0]


def in_plan(store_dir, shard_name: str) -> bool:
    """Whether the plan a shard is named for still lists it (not when that plan was written again since)."""
    path = Path(store_dir) / "plans" / f"{plan_of(shard_name)}.json"
    return path.is_file() and any(s["name"] == shard_name for s in manifests.read_json(path)["shards"])


def verify_store(store_dir) -> tuple[list[str], dict]:
    """Deep check of one store: every shard opens, is complete, finite, matches its checksum and encoder;
    every split index points at the right rows and covers its manifest. Returns (problems, counts)."""
    store_dir = Path(store_dir)
    problems, counts = [], {"shards": 0, "rows": 0, "indexes": 0}
    held_by = {}
    for path in shards.list_shards(store_dir):
        counts["shards"] += 1
        found = shards.check_shard(path, deep=True)
        if not found and shards.read_attrs(path).get("fingerprint") != store_dir.name:
            found = [f"encoder fingerprint {shards.read_attrs(path).get('fingerprint')} != store {store_dir.name}"]
        problems += [f"{path}: {p}" for p in found]
        if not found:
            held_by[path.stem] = shards.read_contents(path)
            counts["rows"] += len(held_by[path.stem])
    workspace_dir = store_dir.parent.parent
    for index_path in sorted(store_dir.glob("splits/*/*.json")):
        counts["indexes"] += 1
        index = manifests.read_json(index_path)
        unusable, wrong_rows = {}, []
        for image_id, (shard, row) in index["images"].items():
            if shard not in held_by:
                unusable[shard] = unusable.get(shard, 0) + 1
            elif row >= len(held_by[shard]) or held_by[shard][row] != index["contents"][image_id]:
                wrong_rows.append(f"{image_id} → {shard}[{row}]")
        problems += [f"{index_path}: {n} images point at {shard}, which is missing or damaged"
                     for shard, n in unusable.items()]
        if wrong_rows:
            problems.append(f"{index_path}: {len(wrong_rows)} images point at rows holding other content "
                            f"(first: {wrong_rows[:3]})")
        manifest = manifests.manifest_path(workspace_dir / "annotations" / index.get("annotations", "?"),
                                           index["split"])
        if manifest.is_file():
            listed = set(index["images"]) | set(index["skipped"])
            absent = [r["image_id"] for r in manifests.read_manifest(manifest) if str(r["image_id"]) not in listed]
            if absent:
                problems.append(f"{index_path}: {len(absent)} images of {manifest} are not indexed "
                                f"(first: {absent[:5]})")
    return problems, counts
