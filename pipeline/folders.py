"""Captioning a folder of new images (the CaptionImages stage), incrementally.

    listing      every image file under the folder (recursive; jpg, jpeg, png, webp, bmp, gif, any case):
                 {relative path: [size, mtime_ns, content key]}; the stage's fingerprint includes the paths,
                 sizes and mtimes, so a folder that changed is a new output and an unchanged one is complete
    content key  sha256 of the file's bytes (storage/contents.py; read only when the file is new or changed);
                 outputs number images by it as an int64 ≥ 2^62, never a COCO id
    features     the encoder's one store, shared with dataset images and keyed by content: a picture that is
                 also in a dataset is not extracted again; shards `shard-folder-<fp>-<k>.h5`
    captions     decoded only for contents the previous output of the same folder, model and decoding lacks

Writes captions.jsonl ({"path", "caption", "score"} per captioned image, sorted by path), captions.csv (the
same), attention.h5 (storage.shards attention format; paths `images:0/<relative path>`, the folder in
attrs["image_roots"]), listing.json and report.json (counts, what was reused, every skipped file and why).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.progress import Progress
from storage import contents, manifests, shards, workspace

log = logging.getLogger("captioner")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FILES = ("captions.jsonl", "captions.csv", "attention.h5", "listing.json", "report.json")


def list_images(folder) -> dict[str, list[int]]:
    """{relative posix path: [size, mtime_ns]} of every image file under `folder` (by its suffix, IMAGE_SUFFIXES),
    sorted by path; how many other files were left out, and their suffixes, is logged."""
    folder = Path(folder)
    found, others = {}, Counter()
    for directory, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(directory) / name
                stat = path.stat()
                found[path.relative_to(folder).as_posix()] = [stat.st_size, stat.st_mtime_ns]
            else:
                others[Path(name).suffix.lower() or name] += 1
    if others:
        log.info("%s: %d files left out, not images by their names (%s); images: %s", folder, sum(others.values()),
                 ", ".join(f"{n} × {s}" for s, n in others.most_common(5)), " ".join(sorted(IMAGE_SUFFIXES)))
    return dict(sorted(found.items()))


def listing_fingerprint(listing: dict) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:12]


def read_previous(previous_dir) -> tuple[dict, dict, dict]:
    """(listing {path: [size, mtime, key]}, captions {id: (caption, score)}, attention {id: (tokens, alphas)}) of
    an earlier output of the same folder, model and decoding, ids from content keys; empty when there is none."""
    if previous_dir is None:
        return {}, {}, {}
    previous_dir = Path(previous_dir)
    listing = manifests.read_json(previous_dir / "listing.json")
    captions, ids_of = {}, {path: contents.key_as_int64(entry[2]) for path, entry in listing.items()}
    for record in manifests.read_manifest(previous_dir / "captions.jsonl"):
        captions[ids_of[record["path"]]] = (record["caption"], record["score"])
    maps = shards.read_all_attention(previous_dir / "attention.h5")
    attention = {int(i): (t, a) for i, t, a in zip(maps["image_ids"], maps["tokens"], maps["attention"])}
    return listing, captions, attention


def identify(folder, listing: dict, cache) -> dict[str, list]:
    """{path: [size, mtime, content key]}; cache: storage.contents.ContentCache (unchanged files are not read)."""
    out = {}
    progress = Progress(len(listing), "identifying folder images", "files")
    for path, (size, mtime) in listing.items():
        out[path] = [size, mtime, cache.key(Path(folder) / path)]
        progress.update()
    return out


def previous_output(stage_dir, current: str, settings: dict, upstream: dict) -> Path | None:
    """The newest complete output in `stage_dir` other than `current` made with the same settings (the folder
    listing aside) and upstream: what a rerun on a changed folder reuses."""
    candidates = []
    for d in Path(stage_dir).glob("[!.]*"):
        if d.name == current or workspace.output_problem(d, ("provenance.json", *FILES)):
            continue
        provenance = manifests.read_json(d / "provenance.json")
        if ({k: v for k, v in provenance["settings"].items() if k != "listing"} == settings
                and provenance["upstream"] == upstream):
            candidates.append(d)
    return max(candidates, key=lambda d: d.stat().st_mtime, default=None)


def caption_folder(outdir, folder, listing: dict, previous_dir, store, cache, extract, decode, shard_size: int,
                   shard_prefix: str, layer: str) -> dict:
    """Stage entry point. store: the encoder's feature store (a directory of shards); cache: a
    storage.contents.ContentCache; extract(shard path, [[key, id, folder, path], ...]) writes one shard;
    decode(index {"images": {id: (shard, row)}}) → (ids, tokens, alphas, scores, captions); layer: the encoder
    layer whose grid the attention maps cover. Returns the report. (Over 50 lines: reuse, extraction, decoding
    and the four output files in the order a reader follows a rerun.)"""
    folder, outdir = Path(folder), Path(outdir)
    _, previous_captions, previous_attention = read_previous(previous_dir)
    listing = identify(folder, listing, cache)
    first_path, key_of = {}, {}
    for path, (_, _, key) in listing.items():
        first_path.setdefault(key, path)
        key_of[contents.key_as_int64(key)] = key

    rows, skipped, bad = shards.store_contents(store)
    for path in bad:
        log.warning("store: %s fails its check; its images are extracted again", path.name)
    todo = [[key, contents.key_as_int64(key), str(folder), path] for key, path in first_path.items()
            if key not in rows and key not in skipped]
    log.info("folder %s: %d images (%d distinct contents), %d to extract", folder, len(listing), len(first_path),
             len(todo))
    new_shards = [Path(store) / f"{shard_prefix}-{k:05d}.h5" for k in range(-(-len(todo) // shard_size))]
    for k, path in enumerate(new_shards):
        extract(path, todo[k * shard_size:(k + 1) * shard_size])
    new_rows, new_skipped, _ = shards.store_contents(store, [p for p in new_shards if p.exists()])
    rows, skipped = {**new_rows, **rows}, {**new_skipped, **skipped}

    wanted = [contents.key_as_int64(k) for k in first_path if k in rows]
    wanted = [i for i in wanted if i not in previous_captions]
    captions, attention = dict(previous_captions), dict(previous_attention)
    if wanted:
        ids, tokens, alphas, scores, texts = decode({"images": {i: rows[key_of[i]] for i in wanted}})
        for image_id, t, a, s, text in zip(ids.tolist(), tokens, alphas, scores.tolist(), texts):
            captions[image_id] = (text, round(float(s), 5))
            attention[image_id] = (t, a)

    lines, problems = [], []
    for path, (_, _, key) in listing.items():
        image_id = contents.key_as_int64(key)
        if image_id in captions and key in rows:
            lines.append({"path": path, "caption": captions[image_id][0], "score": captions[image_id][1]})
        else:
            reason = skipped.get(key, (None, "no features (extraction failed)"))[1]
            problems.append({"path": path, "reason": reason})
            log.warning("skipped %s: %s", folder / path, reason)
    _write_outputs(outdir, folder, listing, lines, attention, layer)
    decoded = set(wanted)
    report = {"folder": str(folder), "images": len(listing), "captioned": len(lines), "skipped": problems,
              "extracted": len(todo), "decoded": len(decoded),
              "reused_captions": sum(1 for line in lines
                                     if contents.key_as_int64(listing[line["path"]][2]) not in decoded),
              "previous_output": Path(previous_dir).name if previous_dir else None}
    manifests.write_json(outdir / "report.json", report)
    return report


def _write_outputs(outdir: Path, folder: Path, listing: dict, lines: list[dict], attention: dict,
                   layer: str) -> None:
    manifests.write_jsonl(outdir / "captions.jsonl", lines)
    with open(outdir / "captions.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "score"])
        writer.writeheader()
        writer.writerows(lines)
    ids = [contents.key_as_int64(listing[line["path"]][2]) for line in lines]
    width = max((len(attention[i][0]) for i in ids), default=0)
    positions = max((attention[i][1].shape[-1] for i in ids), default=0)
    tokens = np.zeros((len(ids), width), np.int32)
    alphas = np.zeros((len(ids), width, positions), np.float16)
    for k, image_id in enumerate(ids):
        t, a = attention[image_id]
        tokens[k, :len(t)], alphas[k, :len(a)] = t, a
    shards.write_attention(outdir / "attention.h5", ids, [f"images:0/{line['path']}" for line in lines], tokens,
                           alphas, {"image_roots": [str(folder)], "layer": layer})
    manifests.write_json(outdir / "listing.json", listing)
