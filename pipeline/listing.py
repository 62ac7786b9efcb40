"""What the image files of an annotation version are now, by stats alone (no file is read): the digest of a
split's sizes and mtimes that a split index records, and the first listed file that is gone. Both answer
completeness checks, so both stat in threads, a batch at a time."""
from __future__ import annotations

import hashlib
import os

from storage import contents, manifests


def split_files(annotations_dir, split: str, image_root):
    """(image_id, root reference, path, absolute image path) of each image of a split, streamed from its
    manifest; image_root(reference) → its directory."""
    roots = {}   # reference → the directory with a trailing separator
    for image_id, root, path in manifests.iter_locations(manifests.manifest_path(annotations_dir, split)):
        if root not in roots:
            roots[root] = os.path.join(str(image_root(root)), "")
        yield image_id, root, path, roots[root] + path if not path.startswith("/") else path


def batches(items, size: int = 8192):
    """Lists of up to `size` consecutive items."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def listing_digest(annotations_dir, split: str, image_root) -> str:
    """A digest of (image id, size, mtime) of every image file of a split: it changes when a file is replaced,
    touched, added or removed. Stats only, a batch at a time in threads; the split index records it
    (ExtractFeatures' completeness check)."""
    digest = hashlib.sha256()
    for batch in batches(split_files(annotations_dir, split, image_root)):
        found = contents.stat_files([item[3] for item in batch], absent=OSError)
        digest.update("".join(f"{image_id} {f[0]} {f[1]}\n" if f else f"{image_id} -\n"
                              for (image_id, *_), f in zip(batch, found)).encode())
    return digest.hexdigest()[:16]


def vanished_image(annotations_dir, image_root) -> str | None:
    """The first image file the manifests of every split list (found when they were written) that is gone now,
    or None. Stats only, a batch at a time in threads (ExtractAnnotations' completeness check)."""
    for split in manifests.SPLITS:
        for batch in batches(split_files(annotations_dir, split, image_root)):
            for item, found in zip(batch, contents.stat_files([item[3] for item in batch], absent=OSError)):
                if found is None:
                    return item[3]
    return None
