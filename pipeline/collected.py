"""What the caption files hold, collected compactly and put in image-id order, with the duplicate, unknown-image
and empty-caption problems found on the way (the first half of the annotations stage, pipeline/annotations.py).

Per image and per caption only a few integers are kept, in arrays; file names and captions go to scratch files
(storage's Spool), one line each, never decoded twice."""
from __future__ import annotations

import json
import logging
from array import array
from pathlib import Path

import numpy as np

from pipeline.captions import normalised_lines
from pipeline.coco_files import read_coco
from pipeline.problems import Problems
from storage import manifests

log = logging.getLogger("captioner")


class Collected:
    """What the caption files hold, compactly: per image its id, per caption its id and its image's id, in arrays
    in the order read (all files one after the other); the rest in spools under `scratch`, one line per image
    (`names`: its file_name as JSON) or per caption (`raw`: the caption as JSON; `normalised`: the normalised
    caption, an empty line when it is empty). Captions are normalised and encoded a batch at a time."""

    BATCH = 16384

    def __init__(self, scratch: Path):
        self.image_ids, self.caption_ids, self.caption_images = array("q"), array("q"), array("q")
        self.without_id, self.empty = array("q"), array("q")   # captions without an id, empty ones (rare)
        self.images_read, self.captions_read = [], []           # after each file: images, captions so far
        self.extras: dict[int, bytes] = {}                      # image → its plug-in fields (extensions)
        self.names, self.raw, self.normalised = (manifests.Spool(scratch / name)
                                                 for name in ("names", "raw", "normalised"))
        self._names, self._captions = [], []                    # the batches

    def read(self, path, problems: Problems, progress_callback=None) -> None:
        """Add an annotation file."""
        ids, names, batch = self.image_ids.append, self._names.append, self.BATCH

        def on_image(image_id, file_name, fields):
            ids(image_id)
            names(file_name)
            if fields:
                self.extras[len(self.image_ids) - 1] = manifests.extra_keys_json(fields)
            if len(self._names) >= batch:
                self._flush()

        caption_ids, images, captions = self.caption_ids, self.caption_images.append, self._captions.append
        caption_id_of, without_id = caption_ids.append, self.without_id.append

        def on_annotation(caption_id, image_id, caption):
            if caption_id is None:
                without_id(len(caption_ids))
                caption_id = 0
            caption_id_of(caption_id)
            images(image_id)
            captions(caption)
            if len(self._captions) >= batch:
                self._flush()

        n_images, n_captions = read_coco(path, on_image, on_annotation, problems, progress_callback)
        self._flush()
        self.images_read.append(len(self.image_ids))
        self.captions_read.append(len(self.caption_ids))
        log.info("read %s: %d images, %d captions", path, n_images, n_captions)

    def _flush(self) -> None:
        """Encode and write the batches."""
        if self._names:
            self.names.add_lines(manifests.json_lines(self._names), len(self._names))
            self._names.clear()
        if self._captions:
            self.raw.add_lines(manifests.json_lines(self._captions), len(self._captions))
            normalised = normalised_lines(self._captions)
            if b"" in normalised:
                first = len(self.caption_ids) - len(normalised)
                self.empty.extend(first + j for j, text in enumerate(normalised) if not text)
            self.normalised.add_lines(b"\n".join(normalised) + b"\n", len(normalised))
            self._captions.clear()

    def close(self) -> None:
        for spool in (self.names, self.raw, self.normalised):
            spool.close()

    def release(self) -> None:
        """Drop the arrays (once Sorted has what it needs of them)."""
        self.image_ids, self.caption_ids, self.caption_images = array("q"), array("q"), array("q")

    def arrays(self) -> dict:
        """The arrays as numpy arrays, with each entry's file (index) and the captions' masks."""
        n_captions = len(self.caption_ids)
        has_id, empty = np.ones(n_captions, bool), np.zeros(n_captions, bool)
        has_id[np.frombuffer(self.without_id, np.int64)] = False
        empty[np.frombuffer(self.empty, np.int64)] = True
        files = lambda read: np.repeat(np.arange(len(read), dtype=np.int32), np.diff(read, prepend=0))
        return {"image_ids": np.frombuffer(self.image_ids, np.int64), "image_files": files(self.images_read),
                "caption_ids": np.frombuffer(self.caption_ids, np.int64), "has_id": has_id,
                "images": np.frombuffer(self.caption_images, np.int64), "caption_files": files(self.captions_read),
                "empty": empty}



class Sorted:
    """The images and captions kept, with the duplicate, unknown-image and empty-caption problems found on the
    way: images by id (`ids`, `files`, `index`: each one's place in the order read), captions by image id, then
    in the order read (`caption_order`; `kept`: a mask over all captions), `counts` captions per image,
    `image_of` each caption's image by its place in `ids`."""

    def __init__(self, c: Collected, files: list[str], problems: Problems):
        a = c.arrays()
        image_ids, image_files = a["image_ids"], a["image_files"]
        duplicate = _later_duplicates(image_ids, np.ones(len(image_ids), bool))
        kept = np.flatnonzero(~duplicate)
        self.index = kept[np.argsort(image_ids[kept])]        # each id's first image, by id
        self.ids, self.files = image_ids[self.index], image_files[self.index]
        _list(problems, "duplicate_image_id", duplicate,
              lambda k: {"file": files[image_files[k]], "image_id": int(image_ids[k])})
        self._captions(c, a, files, problems)

    def _captions(self, c: Collected, a: dict, files: list[str], problems: Problems) -> None:
        caption_ids, has_id, images, caption_files, empty = (a["caption_ids"], a["has_id"], a["images"],
                                                             a["caption_files"], a["empty"])
        duplicate = _later_duplicates(caption_ids, has_id)
        self.image_of, known = self._images_of(images, caption_files)
        caption_id = lambda k: int(caption_ids[k]) if has_id[k] else None
        _list(problems, "duplicate_caption_id", duplicate,
              lambda k: {"file": files[caption_files[k]], "caption_id": int(caption_ids[k])})
        _list(problems, "caption_for_unknown_image", ~duplicate & ~known,
              lambda k: {"file": files[caption_files[k]], "caption_id": caption_id(k), "image_id": int(images[k])})
        empty_kept = ~duplicate & known & empty
        raw_of = _spool_lines(c.raw, np.flatnonzero(empty_kept)[:problems.wanted("empty_caption")])
        _list(problems, "empty_caption", empty_kept,
              lambda k: {"file": files[caption_files[k]], "caption_id": caption_id(k), "image_id": int(images[k]),
                         "caption": json.loads(raw_of[k])})
        self.kept = ~duplicate & known & ~empty
        kept = np.flatnonzero(self.kept)
        order = self.image_of[kept].astype(np.int64)   # by image, then as read: unique, so np.sort will do
        self.counts = np.bincount(order, minlength=len(self.ids))
        order *= max(len(caption_ids), 1)
        order += kept
        del kept
        order.sort()
        order %= max(len(caption_ids), 1)
        self.caption_order = order.astype(_index_type(len(caption_ids)))

    def _images_of(self, images: np.ndarray, caption_files: np.ndarray, step: int = 1 << 20):
        """(each caption's image by its place in self.ids, whether that image is the caption's: listed in the
        caption's file), a million captions at a time."""
        image_of, known = np.zeros(len(images), _index_type(len(self.ids))), np.zeros(len(images), bool)
        for lo in range(0, len(images) if len(self.ids) else 0, step):
            where = np.searchsorted(self.ids, images[lo:lo + step])
            at = np.minimum(where, len(self.ids) - 1)
            known[lo:lo + step] = ((where < len(self.ids)) & (self.ids[at] == images[lo:lo + step])
                                   & (self.files[at] == caption_files[lo:lo + step]))
            image_of[lo:lo + step] = at
        return image_of, known


def _index_type(n: int):
    """The integer type of indexes into n entries."""
    return np.int32 if n < 2 ** 31 else np.int64


def _later_duplicates(ids: np.ndarray, has_id: np.ndarray) -> np.ndarray:
    """A mask of the entries whose id (where has_id) an earlier entry has too."""
    duplicate = np.zeros(len(ids), bool)
    values = ids[has_id]
    values.sort()
    repeated = np.unique(values[1:][values[1:] == values[:-1]])
    if len(repeated):   # rare: only the entries with a repeated id, in the order read
        at = np.flatnonzero(has_id & np.isin(ids, repeated))
        order = at[np.argsort(ids[at], kind="stable")]
        duplicate[order[1:][ids[order][1:] == ids[order][:-1]]] = True
    return duplicate


def _list(problems: Problems, kind: str, mask: np.ndarray, instance) -> None:
    """Count the entries `mask` marks as `kind`; list the first ones (instance(k) of entry k)."""
    found = np.flatnonzero(mask)
    for k in found[:problems.wanted(kind)].tolist():
        problems.listed[kind].append(instance(k))
    problems.counts[kind] += len(found)


def _spool_lines(spool: manifests.Spool, wanted: np.ndarray) -> dict[int, bytes]:
    """{line number: line} of the lines `wanted` of a spool (a few: the listed problems)."""
    wanted, out, done = set(wanted.tolist()), {}, 0
    if wanted:
        for lines in spool.blocks():
            out.update((done + j, lines[j]) for j in range(len(lines)) if done + j in wanted)
            done += len(lines)
    return out
