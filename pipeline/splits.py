"""Which split an image belongs to: a hash of (seed, image id) against the fractions when no Karpathy split
file is given, so an image's split never changes when the file grows; how two assignments differ; and the
pictures two splits share."""
from __future__ import annotations

import hashlib
import logging

import numpy as np

from storage.manifests import SPLITS

log = logging.getLogger("captioner")


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
    def arrays(assignment):
        ids = np.fromiter(assignment.keys(), np.int64, len(assignment))
        codes = np.fromiter((SPLITS.index(s) for s in assignment.values()), np.int8, len(assignment))
        order = np.argsort(ids)
        return ids[order], codes[order]
    return split_codes_changes(*arrays(previous), *arrays(current))


def split_codes_changes(previous_ids, previous_codes, ids, codes) -> dict:
    """split_changes of two assignments given as (sorted unique image ids, split indexes)."""
    common, at_previous, at_current = np.intersect1d(previous_ids, ids, assume_unique=True, return_indices=True)
    changed = previous_codes[at_previous] != codes[at_current]
    moved = common[changed]
    return {"compared_images": len(common), "moved": len(moved),
            "examples": [{"image_id": int(i), "was": SPLITS[was], "now": SPLITS[now]} for i, was, now in
                         zip(moved[:20], previous_codes[at_previous][changed][:20], codes[at_current][changed][:20])]}



def split_lookup(ids: np.ndarray, codes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """codes[ids == w] for each w of `wanted` (ids sorted), −1 where absent."""
    if not len(ids):
        return np.full(len(wanted), -1, np.int8)
    at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return np.where(ids[at] == wanted, codes[at], -1).astype(np.int8)


def shared_pictures(seen: dict) -> dict:
    """{"train/test": n, …}: pictures (by content) that two splits both hold, each pair logged with an example,
    since a test picture also trained on inflates the test scores. seen: {split: (content keys' first 64 bits,
    image ids)}."""
    out = {}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common, ia, ib = np.intersect1d(np.frombuffer(seen[a][0], np.uint64), np.frombuffer(seen[b][0], np.uint64),
                                        return_indices=True)
        if len(common):
            out[f"{a}/{b}"] = len(common)
            log.warning("splits: %d %s pictures are byte-identical to %s ones (first: %s image %d, %s image %d): "
                        "its scores count pictures the model %s. Fix: keep each picture in one split", len(common),
                        b, a, b, seen[b][1][ib[0]], a, seen[a][1][ia[0]],
                        "trained on" if a == "train" else "was selected on")
    return out
