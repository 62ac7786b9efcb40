"""Stage 1: COCO caption files (+ optional Karpathy split) → one manifest per split and a report.

Caption normalisation rule (applied to every caption, documented in the README):
  1. Unicode NFKC, typographic apostrophes (’ ‘ ʼ) become ', then lowercase;
  2. every character that is not a letter, a digit or an apostrophe becomes a space
     (so "left-to-right," → "left to right");
  3. an apostrophe survives only between two letters/digits ("man's" stays, "dogs'" → "dogs");
  4. whitespace runs collapse to one space; leading/trailing space is removed.
Tokens are the space-separated words of the normalised caption.

Problems of single entries are counted, listed in the report and skipped — the run goes on: malformed
image or annotation entries, captions that are not strings, unknown image ids in captions, images without
captions, missing image files, empty captions, duplicate image or caption ids, images absent from the Karpathy
split. The counts are exact; the report lists the first LISTED_PER_KIND instances of each kind. A file whose
structure is wrong (not readable, not UTF-8, not JSON, no top-level `images` / `annotations` lists, one of
them twice) raises InputError naming the file and the field.

Splits: Karpathy's file when given, else split_of_image — a hash of (seed, image id) against the fractions,
so an image's split never changes when the file grows.

Memory: a caption file is read as a stream (_JsonFile: blocks of bytes, one list item parsed at a time, the
json module's own messages and positions for a file that is not JSON). What is kept of an image or a caption is
a few integers in arrays; file names and captions go to scratch files under the output directory (storage's
Spool), are put in image-id order part by part, and are copied into the manifests without being decoded again.
Memory grows by about 50 bytes per caption (under 500 MB for a million images with five captions each, the
process included); scratch disk peaks at about one and a half times the manifests' size while the stage runs.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
import re
import operator
import shutil
import stat
import tempfile
import unicodedata
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.progress import Progress
from storage import manifests
from storage.contents import in_threads
from storage.workspace import portable

log = logging.getLogger("captioner")

SPLITS = manifests.SPLITS
PROBLEM_KINDS = (
    "malformed_image",             # images[i] not an object, or without an integer id (64-bit) or a string file_name
    "malformed_annotation",        # annotations[i] not an object, or without an integer image_id (or id), 64-bit
    "caption_not_a_string",        # caption missing, null, a number, a list …: that caption dropped
    "caption_for_unknown_image",   # annotation whose image_id is not in images[]
    "image_without_captions",      # image with no (non-empty) caption: dropped
    "missing_image_file",          # images[].file_name not found under its image root: dropped
    "image_outside_root",          # images[].file_name absolute or climbing out of its root with '..': dropped
    "empty_caption",               # caption empty after normalisation: dropped
    "duplicate_image_id",          # the same image id listed again (same or another file): later one dropped
    "duplicate_caption_id",        # the same annotation id again: later one dropped
    "image_not_in_split",          # Karpathy split given but the image is not in it: dropped
)
LISTED_PER_KIND = 1000   # problem instances listed in report.json per kind (the counts are always exact)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_NOT_WORD = re.compile(r"[^\w']|_")
_LOOSE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
# the same on text where only a-z 0-9 ' remain, as an apostrophe then a look back (so re searches for ' alone)
_LOOSE_APOSTROPHE_ASCII = re.compile(rb"'(?:(?<![a-z0-9]')|(?![a-z0-9]))")
_SPACE_RUNS = re.compile(rb"  +")
# steps 1-2 of the rule for ASCII text (NFKC leaves ASCII alone): letters lowercased, digits and ' kept, ` → ',
# every other byte a space
_ASCII_WORD = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or 48 <= c <= 57 or c == 39 else
                    39 if c == 96 else 32 for c in range(256))
_ASCII_LINES = _ASCII_WORD[:10] + b"\n" + _ASCII_WORD[11:]   # the same, newlines kept (between two captions)


def normalize_caption(text: str) -> str:
    """Apply the normalisation rule of this module's docstring. 'A Dog,  running. ' → 'a dog running'."""
    if text.isascii():
        text = text.encode("ascii").translate(_ASCII_WORD).decode("ascii")
    else:
        text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
        text = _NOT_WORD.sub(" ", text)
    if "'" in text:
        text = _LOOSE_APOSTROPHE.sub(" ", text)
    return " ".join(text.split())


def tokenize(caption: str) -> list[str]:
    """Words of a caption after normalisation."""
    return normalize_caption(caption).split()


# ---------------------------------------------------------------------------------------------- reading

_SCAN = json.JSONDecoder().scan_once   # the json module's scanner: json.loads' values, messages and positions
_SPACE = re.compile(r"[ \t\n\r]*")
_BLOCK = 1 << 22        # bytes read at a time
_AHEAD = 1 << 16        # characters kept ahead of a value before it is parsed
_NEAR_END = 16          # a parse error this close to the end of the text read so far may be a value cut in two
_INT64 = (-(1 << 63), (1 << 63) - 1)


class _JsonFile:
    """A JSON file read in blocks: checked as UTF-8 and as JSON like json.loads(file.read().decode()) (the same
    messages, positions and precedence: a byte that is not UTF-8 anywhere is named before a JSON error), with
    the list members of its top-level object handed over item by item, so the file is never whole in memory.

        reader = _JsonFile(path, "COCO captions file")
        top = reader.parse({"images": on_image})   # on_image(i, item) for each item of the `images` list
        # top: the top-level value when it is not an object; reader.seen: its keys in order;
        # reader.not_lists: {handled key: its value} for handled keys whose value is not a list
    """

    def __init__(self, path, what: str, progress_callback=None):
        self.path, self.what = path, what
        try:
            self._file = open(path, "rb")
            size = os.fstat(self._file.fileno()).st_size
        except OSError as e:
            raise InputError(f"{path}: cannot read {what}: {e.strerror or e}. Fix: check the path in the config.") \
                from e
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos = "", 0                 # text read and not dropped yet; where parsing is in it
        self._dropped, self._newlines, self._last_newline = 0, 0, -1   # characters, newlines before self.text
        self._bytes, self.eof = 0, False
        self._single = 0                            # items are parsed one at a time before this character
        self._progress = Progress(max(size >> 20, 1), f"reading {Path(path).name}", "MiB", progress_callback)
        self.seen, self.not_lists = [], {}

    def parse(self, members: dict):
        """Parse the whole file (see the class docstring); InputError when it is not UTF-8 or not JSON."""
        try:
            while not self.text and self._more():   # the first character (a block may end inside it)
                pass
            if self.text.startswith("\ufeff"):
                raise self._bad_json("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0)
            self._skip()
            top = None
            if self.text.startswith("{", self.pos):
                self.pos += 1
                self._members(members)
            else:
                top = self._value()
            self._skip()
            if self.pos < len(self.text):
                raise self._bad_json("Extra data", self.pos)
            return top
        finally:
            self._file.close()

    def _members(self, members: dict) -> None:
        """The top-level object after its '{', as json's scanner parses an object."""
        self._skip()
        if self.text.startswith("}", self.pos):
            self.pos += 1
            return
        while True:
            if not self.text.startswith('"', self.pos):
                raise self._bad_json("Expecting property name enclosed in double quotes", self.pos)
            key = self._value()
            self._skip()
            if not self.text.startswith(":", self.pos):
                raise self._bad_json("Expecting ':' delimiter", self.pos)
            self.pos += 1
            self._skip()
            handle = members.get(key)
            if handle is not None and self.text.startswith("[", self.pos):
                self.pos += 1
                self._items(handle)
            elif handle is not None:
                self.not_lists[key] = self._value()
            else:
                self._value()
            self.seen.append(key)
            if self._closed_or_next("}"):
                return

    def _items(self, handle) -> None:
        """A list after its '[': handle(i, item) for each item, as json's scanner parses a list."""
        self._skip()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return
        i = 0
        while True:
            items = (self._many() if len(self.text) - self.pos > _AHEAD and self._dropped + self.pos >= self._single
                     else None)
            for value in items or (self._value(),):   # one item: read on, or the error with its position
                handle(i, value)
                i += 1
            text, pos = self.text, self.pos
            if text.startswith(", ", pos) and pos + 2 < len(text) and text[pos + 2] not in " \t\n\r":
                self.pos = pos + 2   # json.dump's separator: the next item follows at once
                continue
            if self._closed_or_next("]"):
                return

    def _closed_or_next(self, close: str) -> bool:
        """After a member or item: True past the closing `close`, False past a ',' (and the white space after
        it); json's own message otherwise."""
        self._skip()
        if self.text.startswith(close, self.pos):
            self.pos += 1
            return True
        if not self.text.startswith(",", self.pos):
            raise self._bad_json("Expecting ',' delimiter", self.pos)
        self.pos += 1
        self._skip()
        return False

    def _many(self) -> list | None:
        """The items from self.pos to the last object that ends before '}, {' or '},{' in the text read, parsed
        at once as one list (the brackets balance only if the cut falls between two items, never inside a
        string or an item); None when there is no such cut or the items do not parse whole: the caller then
        takes them one at a time, with json's message and position for an error."""
        text, pos = self.text, self.pos
        cut = max(text.rfind("}, {", pos, len(text) - 1), text.rfind("},{", pos, len(text) - 1)) + 1
        if cut <= pos:
            self._single = self._dropped + len(text)
            return None
        try:
            items, end = _SCAN("[" + text[pos:cut] + "]", 0)
        except (StopIteration, json.JSONDecodeError):
            items, end = None, None
        if end != cut - pos + 2 or not items:
            self._single = self._dropped + cut   # one at a time up to there
            return None
        self.pos = cut
        return items

    def _value(self):
        """The JSON value at self.pos, read on until it is whole."""
        if len(self.text) - self.pos < _AHEAD:
            self._more()
        while True:
            try:
                value, end = _SCAN(self.text, self.pos)
            except StopIteration as e:
                message, at = "Expecting value", e.value
            except json.JSONDecodeError as e:
                message, at = e.msg, e.pos
            else:
                if end < len(self.text) or not self._more():   # a number at the end may go on in the next block
                    self.pos = end
                    return value
                continue
            if (at >= len(self.text) - _NEAR_END or message.startswith("Unterminated string")) and self._more():
                continue
            raise self._bad_json(message, at)

    def _skip(self) -> None:
        """Past whitespace, reading on at the end of the text read."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self._more():
                return

    def _more(self) -> bool:
        """Append the next block's text, dropping what was parsed; False (nothing changed) at the end of the file."""
        if self.eof:
            return False
        try:
            block = self._file.read(_BLOCK)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read {self.what}: {e.strerror or e}. Fix: check the file.") from e
        pending = len(self._decoder.getstate()[0])   # bytes of a character cut by the previous block
        try:
            text = self._decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise self._not_utf8(self._bytes - pending + e.start) from e
        self._progress.update(((self._bytes + len(block)) >> 20) - (self._bytes >> 20))
        self._bytes += len(block)
        if not block:
            self.eof = True
            return False
        if self.pos:
            newlines = self.text.count("\n", 0, self.pos)
            if newlines:
                self._newlines += newlines
                self._last_newline = self._dropped + self.text.rfind("\n", 0, self.pos)
            self._dropped += self.pos
            self.text, self.pos = self.text[self.pos:], 0
        self.text += text
        return True

    def _not_utf8(self, offset: int) -> InputError:
        return InputError(f"{self.path}: {self.what} is not UTF-8 text (invalid byte at offset {offset}). "
                          "Fix: re-save the file as UTF-8.")

    def _bad_json(self, message: str, at: int) -> InputError:
        """The error for a JSON error at position `at` of self.text (json.loads' line and column)."""
        newline = self.text.rfind("\n", 0, at)
        line = self._newlines + self.text.count("\n", 0, at) + 1
        column = at - newline if newline >= 0 else self._dropped + at - self._last_newline
        while not self.eof:   # the rest of the file, checked as UTF-8 only (which a whole-file decode reports first)
            self.text, self.pos = "", 0
            self._more()
        return InputError(f"{self.path}: {self.what} is not valid JSON: {message} at line {line} column {column}. "
                          "Fix: repair or re-download the file.")


def _expect(path, field: str, value, kind, kind_name: str):
    """`value` if it is a `kind` (a JSON true/false is never an int), else a file-level InputError."""
    if not _is(value, kind):
        raise InputError(f"{path}: {field}: expected {kind_name}, got {type(value).__name__} {value!r:.60}. "
                         "Fix: this does not look like a COCO captions file (captions_*.json); check the file.")
    return value


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)   # bool is an int subclass in Python


def _is_id(value) -> bool:
    """A JSON integer in int64's range (what manifests, shards and split indexes hold)."""
    return type(value) is int and _INT64[0] <= value <= _INT64[1]


def _id_problem(value, key: str) -> str:
    if type(value) is int:
        return f"'{key}' {value} is outside the 64-bit integer range"
    return f"no integer '{key}' (got {value!r:.60})"


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


class _Problems:
    """Problems found: exact counts per kind, and the first `limit` instances of each kind in the order found."""

    def __init__(self, limit: int | None = None):
        self.limit = LISTED_PER_KIND if limit is None else limit
        self.counts = dict.fromkeys(PROBLEM_KINDS, 0)
        self.listed = {kind: [] for kind in PROBLEM_KINDS}

    def add(self, kind: str, instance: dict) -> None:
        self.counts[kind] += 1
        if len(self.listed[kind]) < self.limit:
            self.listed[kind].append(instance)

    def wanted(self, kind: str) -> int:
        """How many more instances of `kind` would be listed."""
        return self.limit - len(self.listed[kind])

    def lists(self) -> dict:
        return {kind: instances for kind, instances in self.listed.items() if instances}


def _read_coco(path, on_image, on_annotation, problems: _Problems, progress_callback=None) -> tuple[int, int]:
    """Stream one COCO captions file: on_image(image_id, file_name, entry) for each well-formed image entry,
    on_annotation(caption_id or None, image_id, caption) for each well-formed annotation, in file order; malformed
    entries (malformed_image, malformed_annotation, caption_not_a_string) go to `problems`. Returns how many of
    each were well-formed. The file's structure is checked strictly: InputError naming the file and the field."""
    file, good, (low, high) = str(path), [0, 0], _INT64

    def skip(kind, where, i, reason, **more):
        problems.add(kind, {"file": file, "entry": f"{where}[{i}]", "reason": reason, **more})

    def image(i, entry):
        if type(entry) is dict:
            image_id, file_name = entry.get("id"), entry.get("file_name")
            if type(image_id) is int and low <= image_id <= high and type(file_name) is str:
                good[0] += 1
                return on_image(image_id, file_name, entry)
        if type(entry) is not dict:
            skip("malformed_image", "images", i, f"not an object: {entry!r:.60}")
        elif not _is_id(entry.get("id")):
            skip("malformed_image", "images", i, _id_problem(entry.get("id"), "id"))
        elif type(entry.get("file_name")) is not str:
            skip("malformed_image", "images", i, f"no string 'file_name' (got {entry.get('file_name')!r:.60})",
                 image_id=entry["id"])

    def annotation(i, entry):
        if type(entry) is dict:
            image_id, caption_id, caption = entry.get("image_id"), entry.get("id"), entry.get("caption")
            if (type(image_id) is int and low <= image_id <= high and type(caption) is str
                    and (caption_id is None or type(caption_id) is int and low <= caption_id <= high)):
                good[1] += 1
                return on_annotation(caption_id, image_id, caption)
        if type(entry) is not dict:
            return skip("malformed_annotation", "annotations", i, f"not an object: {entry!r:.60}")
        image_id, caption_id, caption = entry.get("image_id"), entry.get("id"), entry.get("caption")
        if not _is_id(image_id):
            skip("malformed_annotation", "annotations", i, _id_problem(image_id, "image_id"))
        elif caption_id is not None and not _is_id(caption_id):
            skip("malformed_annotation", "annotations", i, f"'id' {caption_id} is outside the 64-bit integer range"
                 if type(caption_id) is int else f"'id' is not an integer (got {caption_id!r:.60})", image_id=image_id)
        elif type(caption) is not str:
            skip("caption_not_a_string", "annotations", i,
                 "no 'caption'" if "caption" not in entry else f"caption is {caption!r:.60}",
                 image_id=image_id, caption_id=caption_id)

    reader = _JsonFile(path, "COCO captions file", progress_callback)
    top = reader.parse({"images": image, "annotations": annotation})
    if top is not None:
        _expect(path, "top level", top, dict, "a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in reader.seen:
            raise InputError(f"{path}: missing key '{key}' at top level. Fix: use a COCO captions file "
                             "(e.g. annotations/captions_train2014.json), not instances_* or another file.")
        if reader.seen.count(key) > 1:
            raise InputError(f"{path}: key '{key}' appears {reader.seen.count(key)} times at top level. Fix: "
                             "keep one list of each; this does not look like a COCO captions file.")
        if key in reader.not_lists:
            _expect(path, key, reader.not_lists[key], list, "a list")
    return good[0], good[1]


def load_coco_captions(path: str | os.PathLike) -> tuple[list[dict], list[dict], dict[str, list]]:
    """Parse and type-check a COCO captions file → (images, annotations, problems): lists of
    {"id", "file_name", …digit metadata} and {"id" (or None), "image_id", "caption"}, and the malformed entries
    that were skipped {kind: [instance, …]} (malformed_image, malformed_annotation, caption_not_a_string; the first
    LISTED_PER_KIND of each kind).

    The file's structure is checked strictly — not JSON, or missing or wrongly typed top-level `images` /
    `annotations`: InputError naming the file. One bad entry among thousands is skipped and reported instead.
    Holds the whole file's entries: the stage itself streams (make_annotations)."""
    images, annotations, problems = [], [], _Problems()
    _read_coco(path, lambda image_id, name, entry: images.append({"id": image_id, "file_name": name,
                                                                  **_digit_metadata(entry)}),
               lambda caption_id, image_id, caption: annotations.append({"id": caption_id, "image_id": image_id,
                                                                         "caption": caption}), problems)
    return images, annotations, problems.lists()


def load_karpathy_split(path: str | os.PathLike) -> dict[int, str]:
    """Karpathy's dataset_coco.json → {coco image id: 'train' | 'val' | 'test'} ('restval' counts as train)."""
    ids, codes = _karpathy_split(path)
    return {image_id: SPLITS[code] for image_id, code in zip(ids.tolist(), codes.tolist())}


def _karpathy_split(path) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, sorted; the split of each as an index into SPLITS) of a Karpathy split file, streamed. An id
    listed twice keeps its last split."""
    ids, codes, errors = array("q"), array("b"), []

    def image(i, entry):
        if errors:
            return
        try:
            _expect(path, f"images[{i}]", entry, dict, "an object")
            for key in ("cocoid", "split"):
                if key not in entry:
                    raise InputError(f"{path}: images[{i}] has no '{key}'. Fix: use Karpathy's dataset_coco.json.")
            split = entry["split"]
            if split not in ("train", "restval", "val", "test"):
                raise InputError(f"{path}: images[{i}].split = {split!r}: expected train, restval, val or test.")
            cocoid = _expect(path, f"images[{i}].cocoid", entry["cocoid"], int, "an integer")
            if not _is_id(cocoid):
                raise InputError(f"{path}: images[{i}].cocoid = {cocoid}: outside the 64-bit integer range.")
        except InputError as e:
            errors.append(e)   # raised once the whole file is known to be JSON, as a whole-file parse would
            return
        ids.append(cocoid)
        codes.append(SPLITS.index("train" if split == "restval" else split))

    reader = _JsonFile(path, "Karpathy split file")
    top = reader.parse({"images": image})
    if top is not None or reader.seen.count("images") != 1 or "images" in reader.not_lists:
        raise InputError(f"{path}: expected an object with an 'images' list (Karpathy's dataset_coco.json). "
                         "Fix: point [dataset] karpathy_split at dataset_coco.json.")
    if errors:
        raise errors[0]
    last_first = np.frombuffer(ids, np.int64)[::-1]
    unique, where = np.unique(last_first, return_index=True)
    return unique, np.frombuffer(codes, np.int8)[::-1][where]


# --------------------------------------------------------------------------------------------- splitting

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
    return _split_changes(*arrays(previous), *arrays(current))


def _split_changes(previous_ids, previous_codes, ids, codes) -> dict:
    """split_changes of two assignments given as (sorted unique image ids, split indexes)."""
    common, at_previous, at_current = np.intersect1d(previous_ids, ids, assume_unique=True, return_indices=True)
    changed = previous_codes[at_previous] != codes[at_current]
    moved = common[changed]
    return {"compared_images": len(common), "moved": len(moved),
            "examples": [{"image_id": int(i), "was": SPLITS[was], "now": SPLITS[now]} for i, was, now in
                         zip(moved[:20], previous_codes[at_previous][changed][:20], codes[at_current][changed][:20])]}


# ------------------------------------------------------------------------------------------------ stage

class _Collected:
    """What the caption files hold, compactly: per image its id, per caption its id and its image's id, in arrays
    in the order read (all files one after the other); the rest in spools under `scratch`, one line per image
    (`names`: its file_name as JSON) or per caption (`raw`: the caption as JSON; `normalised`: the normalised
    caption, an empty line when it is empty). Captions are normalised and encoded a batch at a time."""

    BATCH = 16384

    def __init__(self, scratch: Path):
        self.image_ids, self.caption_ids, self.caption_images = array("q"), array("q"), array("q")
        self.without_id, self.empty = array("q"), array("q")   # captions without an id, empty ones (rare)
        self.images_read, self.captions_read = [], []           # after each file: images, captions so far
        self.extras: dict[int, bytes] = {}                      # image → its optional manifest keys (digit data)
        self.names, self.raw, self.normalised = (manifests.Spool(scratch / name)
                                                 for name in ("names", "raw", "normalised"))
        self._names, self._captions = [], []                    # the batches

    def read(self, path, problems: _Problems, progress_callback=None) -> None:
        """Add an annotation file."""
        ids, names, batch = self.image_ids.append, self._names.append, self.BATCH

        def on_image(image_id, file_name, entry):
            ids(image_id)
            names(file_name)
            if "digits" in entry and _digit_metadata(entry):
                self.extras[len(self.image_ids) - 1] = manifests.optional_keys_json(_digit_metadata(entry))
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

        n_images, n_captions = _read_coco(path, on_image, on_annotation, problems, progress_callback)
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
            normalised = _normalised_lines(self._captions)
            if b"" in normalised:
                first = len(self.caption_ids) - len(normalised)
                self.empty.extend(first + j for j, text in enumerate(normalised) if not text)
            self.normalised.add_lines(b"\n".join(normalised) + b"\n", len(normalised))
            self._captions.clear()

    def close(self) -> None:
        for spool in (self.names, self.raw, self.normalised):
            spool.close()

    def release(self) -> None:
        """Drop the arrays (once _Sorted has what it needs of them)."""
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


def _normalised_lines(captions: list[str]) -> list[bytes]:
    """normalize_caption of each caption, UTF-8. ASCII captions (nearly all) are normalised together, as one
    text with a newline between two captions."""
    joined = "\n".join(captions)
    if joined.isascii() and joined.count("\n") == len(captions) - 1:
        return _normalised_ascii(joined)
    simple = [caption.isascii() and "\n" not in caption for caption in captions]
    out = [b""] * len(captions)
    if any(simple):
        texts = _normalised_ascii("\n".join(caption for caption, ok in zip(captions, simple) if ok))
        for j, text in zip((j for j, ok in enumerate(simple) if ok), texts):
            out[j] = text
    for j in (j for j, ok in enumerate(simple) if not ok):
        out[j] = normalize_caption(captions[j]).encode("utf-8")
    return out


def _normalised_ascii(joined: str) -> list[bytes]:
    """normalize_caption of each line of `joined` (ASCII text, one caption a line), UTF-8, by operations on the
    whole text (after the translation only a-z, 0-9, ', space and newline remain)."""
    text = joined.encode("ascii").translate(_ASCII_LINES)
    if b"'" in text:
        text = _LOOSE_APOSTROPHE_ASCII.sub(b" ", text)
    text = _SPACE_RUNS.sub(b" ", text).replace(b" \n", b"\n").replace(b"\n ", b"\n")
    return text.strip(b" ").split(b"\n")


class _Sorted:
    """The images and captions kept, with the duplicate, unknown-image and empty-caption problems found on the
    way: images by id (`ids`, `files`, `index`: each one's place in the order read), captions by image id, then
    in the order read (`caption_order`; `kept`: a mask over all captions), `counts` captions per image,
    `image_of` each caption's image by its place in `ids`."""

    def __init__(self, c: _Collected, files: list[str], problems: _Problems):
        a = c.arrays()
        image_ids, image_files = a["image_ids"], a["image_files"]
        duplicate = _later_duplicates(image_ids, np.ones(len(image_ids), bool))
        kept = np.flatnonzero(~duplicate)
        self.index = kept[np.argsort(image_ids[kept])]        # each id's first image, by id
        self.ids, self.files = image_ids[self.index], image_files[self.index]
        _list(problems, "duplicate_image_id", duplicate,
              lambda k: {"file": files[image_files[k]], "image_id": int(image_ids[k])})
        self._captions(c, a, files, problems)

    def _captions(self, c: _Collected, a: dict, files: list[str], problems: _Problems) -> None:
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


def _list(problems: _Problems, kind: str, mask: np.ndarray, instance) -> None:
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


_PART_LINES = 1 << 18   # images + captions put in order in memory at a time (about 40 MB of COCO captions)


class _Writer:
    """Writes the images kept, by id, into the split manifests: those without captions, outside their root,
    missing or not in the Karpathy split go to `problems`; counts images and captions per split and remembers
    the split of every image written (`ids`, `codes`)."""

    def __init__(self, writers: dict, roots: list[str], root_names: list[str], split_codes, fractions: tuple,
                 problems: _Problems):
        self.writers, self.roots, self.problems = [writers[s] for s in SPLITS], roots, problems
        self.root_names = [manifests.json_string(r) for r in root_names]
        self.split_codes = split_codes
        val, test, seed = fractions
        self.seed, self.test, self.test_or_val = f"{seed}:".encode(), test, test + val   # as split_of_image
        self.counts = {name: {"images": 0, "captions": 0} for name in SPLITS}
        self.ids, self.codes = array("q"), array("b")

    def write(self, part: dict) -> None:
        """The images of one part (_load_part), in id order."""
        problems, roots, at, sha256 = self.problems, self.roots, 0, hashlib.sha256
        raw, normalised, images, captions = part["raw"], part["normalised"], [0, 0, 0], [0, 0, 0]
        for place, image_id, k, n, name_json, name, found in zip(
                part["places"], part["ids"], part["files"], part["counts"], part["names_json"], part["names"],
                part["found"]):
            at += n
            if not found:
                if not n:
                    problems.add("image_without_captions", {"image_id": image_id, "path": name})
                elif not _inside_root(name):
                    problems.add("image_outside_root", {"image_id": image_id, "root": roots[k], "path": name})
                else:
                    problems.add("missing_image_file", {"image_id": image_id, "root": roots[k], "path": name})
                continue
            if self.split_codes is not None:
                code = int(self.split_codes[place])
                if code < 0:
                    problems.add("image_not_in_split", {"image_id": image_id, "path": name})
                    continue
            else:
                u = int.from_bytes(sha256(b"%s%d" % (self.seed, image_id)).digest()[:8], "big") / 2 ** 64
                code = 2 if u < self.test else 1 if u < self.test_or_val else 0
            self.writers[code].add(image_id, self.root_names[k], name_json,
                                   b'"%s"' % b'", "'.join(normalised[at - n:at]), b", ".join(raw[at - n:at]),
                                   part["extras"].get(place, b""))
            images[code] += 1
            captions[code] += n
            self.ids.append(image_id)
            self.codes.append(code)
        for code, name in enumerate(SPLITS):
            self.counts[name]["images"] += images[code]
            self.counts[name]["captions"] += captions[code]


def _inside_root(file_name: str) -> bool:
    """Whether a file_name names a file under its image root: relative, without a '..' component (symbolic
    links inside the root are the dataset's own business)."""
    if ".." not in file_name and not file_name.startswith(("/", "\\")):
        return True
    path = Path(file_name)
    return not path.is_absolute() and not file_name.startswith(("/", "\\")) and ".." not in path.parts


def _gather(wanted: np.ndarray, *files: list[bytes]) -> list[list[bytes]]:
    """Part files hold the lines of the entries `wanted` in the order read (ascending): the same lines in
    `wanted`'s order."""
    assert all(len(lines) == len(wanted) for lines in files), (len(wanted), [len(lines) for lines in files])
    if len(wanted) < 2:
        return [list(lines) for lines in files]
    take = operator.itemgetter(*np.searchsorted(np.sort(wanted), wanted).tolist())
    return [list(take(lines)) for lines in files]


def _load_part(files: dict, k: int, s: _Sorted, lo: int, hi: int, caption_lo: int, caption_hi: int,
               roots: list[str], extras: dict) -> dict:
    """Part k of the spools (images lo … hi - 1 by id), read, put in order and its image files looked up."""
    lines = {key: manifests.read_lines(paths[k]) for key, paths in files.items()}
    for paths in files.values():
        paths[k].unlink()
    names_json, = _gather(s.index[lo:hi], lines["names"])
    raw, normalised = _gather(s.caption_order[caption_lo:caption_hi], lines["raw"], lines["normalised"])
    names = [n[1:-1].decode() if b"\\" not in n else json.loads(n) for n in names_json]
    files_, counts = s.files[lo:hi].tolist(), s.counts[lo:hi].tolist()
    checked = [j for j, (name, n) in enumerate(zip(names, counts)) if n > 0 and _inside_root(name)]
    found = [False] * len(names)
    for j, ok in zip(checked, in_threads(lambda part: list(map(_is_file, part)),
                                         [os.path.join(roots[files_[j]], names[j]) for j in checked])):
        found[j] = ok
    index = s.index[lo:hi].tolist() if extras else []
    return {"places": range(lo, hi), "ids": s.ids[lo:hi].tolist(), "files": files_, "counts": counts,
            "names_json": names_json, "names": names, "found": found,
            "raw": raw, "normalised": normalised,
            "extras": {lo + j: extras[i] for j, i in enumerate(index) if i in extras}}


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _write_manifests(outdir, c: _Collected, s: _Sorted, writer_args: tuple, scratch: Path,
                     progress_callback=None) -> _Writer:
    """Every image kept, by id, with its captions into <split>.jsonl of `outdir`: the spools are cut into parts of
    consecutive images (about _PART_LINES lines each); each part is put in order in memory (the next one in a
    thread meanwhile, its image files looked up) and written."""
    part = ((np.cumsum(s.counts + 1) - 1) // _PART_LINES).astype(np.int32)   # of each image, by id: ascending
    n_parts = int(part[-1]) + 1 if len(part) else 0
    name_parts = np.full(c.names.count, -1, np.int32)
    name_parts[s.index] = part
    caption_parts = np.full(len(s.kept), -1, np.int32)
    if len(part):
        caption_parts[s.kept] = part[s.image_of[s.kept]]
    del s.image_of, s.kept
    files = {"names": c.names.distribute(name_parts, n_parts, scratch, "names"),
             "raw": c.raw.distribute(caption_parts, n_parts, scratch, "raw"),
             "normalised": c.normalised.distribute(caption_parts, n_parts, scratch, "normalised")}
    for spool in (c.names, c.raw, c.normalised):
        spool.path.unlink()
    bounds = np.searchsorted(part, np.arange(n_parts + 1)).tolist()
    caption_bounds = np.concatenate([[0], np.cumsum(s.counts)])[bounds].tolist()
    load = lambda k: _load_part(files, k, s, bounds[k], bounds[k + 1], caption_bounds[k], caption_bounds[k + 1],
                                writer_args[0], c.extras)
    progress = Progress(len(s.ids), "checking image files", "images", progress_callback)
    with contextlib.ExitStack() as stack:
        writers = {name: stack.enter_context(manifests.ManifestWriter(manifests.manifest_path(outdir, name)))
                   for name in SPLITS}
        writer = _Writer(writers, *writer_args)
        pool = stack.enter_context(ThreadPoolExecutor(1))
        loading = pool.submit(load, 0) if n_parts else None
        for k in range(n_parts):
            loaded = loading.result()
            loading = pool.submit(load, k + 1) if k + 1 < n_parts else None
            writer.write(loaded)
            progress.update(bounds[k + 1] - bounds[k])
    return writer


def _split_lookup(ids: np.ndarray, codes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """codes[ids == w] for each w of `wanted` (ids sorted), −1 where absent."""
    if not len(ids):
        return np.full(len(wanted), -1, np.int8)
    at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return np.where(ids[at] == wanted, codes[at], -1).astype(np.int8)


def _write_annotations(outdir, annotation_files, roots: list[str], root_names: list[str], karpathy_split,
                       val_fraction: float, test_fraction: float, seed: int,
                       progress_callback=None) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Read the caption files (`roots`: their resolved image roots, `root_names`: how the manifests name them),
    write <split>.jsonl of every split into `outdir`. Returns (report, (ids, split indexes) of the images
    written, by id)."""
    problems, files = _Problems(), [str(p) for p in annotation_files]
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=outdir))
    try:
        collected = _Collected(scratch)
        for path in annotation_files:
            collected.read(path, problems, progress_callback)
        collected.close()
        karpathy = _karpathy_split(karpathy_split) if karpathy_split else None
        s = _Sorted(collected, files, problems)
        collected.release()
        split_codes = _split_lookup(*karpathy, s.ids) if karpathy else None
        writer = _write_manifests(outdir, collected, s, (roots, root_names, split_codes,
                                                         (val_fraction, test_fraction, seed), problems),
                                  scratch, progress_callback)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "annotation_files": files,
        "image_roots": list(roots),
        "split_method": f"karpathy:{karpathy_split}" if karpathy_split else
                        f"fractions(val={val_fraction}, test={test_fraction}, seed={seed})",
        "normalisation": "NFKC, lowercase, non-alphanumerics to spaces, inner apostrophes kept, spaces collapsed",
        "splits": writer.counts,
        "problem_counts": dict(problems.counts),
        "problems": problems.lists(),
        "problems_listed_at_most": problems.limit,
    }
    for kind, count in problems.counts.items():
        if count:
            log.warning("annotations: %d × %s (first: %s) — skipped, %s", count, kind, problems.listed[kind][0],
                        "listed in report.json" if count <= problems.limit else
                        f"the first {problems.limit} listed in report.json")
    log.info("annotations: %s", ", ".join(f"{s} {c['images']} images / {c['captions']} captions"
                                          for s, c in report["splits"].items()))
    return report, (np.frombuffer(writer.ids, np.int64), np.frombuffer(writer.codes, np.int8))


def extract_annotations(annotation_files, image_roots, karpathy_split=None, val_fraction=0.05,
                        test_fraction=0.05, seed=0, progress_callback=None) -> tuple[dict, dict]:
    """Read COCO caption files (with their image roots, same order) and split them by image.

    Returns (splits, report): splits maps 'train'/'val'/'test' to manifest records (sorted by image id),
    report holds counts and the problems found (see PROBLEM_KINDS). Holds every record in memory (tests,
    small datasets); the stage writes them as it goes (make_annotations)."""
    roots = [str(Path(r).expanduser().resolve()) for r in image_roots]
    with tempfile.TemporaryDirectory(prefix="annotations-") as tmp:
        report, _ = _write_annotations(tmp, annotation_files, roots, roots, karpathy_split, val_fraction,
                                       test_fraction, seed, progress_callback)
        return {name: manifests.read_manifest(manifests.manifest_path(tmp, name)) for name in SPLITS}, report


def make_annotations(outdir: str | os.PathLike, annotation_files, image_roots, karpathy_split=None,
                     val_fraction=0.05, test_fraction=0.05, seed=0, progress_callback=None, previous=None,
                     workspace_root=None) -> dict:
    """Stage 1 entry point: read the caption files, write <split>.jsonl for every split and report.json into
    `outdir`. Image roots are written as references that survive a move (storage.manifests.root_reference):
    relative to `workspace_root` when inside it (the demo's), else `images:<k>`, the k-th configured root.
    `previous`: an earlier annotations output (e.g. last night's), whose split assignment the report compares
    with this one ("split_changes"; the goal is 0 moved images). Returns the report."""
    roots = [str(Path(r).expanduser().resolve()) for r in image_roots]
    references = {}
    if workspace_root is not None:
        references = {str(Path(r).expanduser().resolve()): manifests.root_reference(r, k, workspace_root)
                      for k, r in enumerate(image_roots)}
    report, assignment = _write_annotations(outdir, annotation_files, roots, [references.get(r, r) for r in roots],
                                            karpathy_split, val_fraction, test_fraction, seed, progress_callback)
    if not report["splits"]["train"]["images"]:
        for name in SPLITS:
            manifests.manifest_path(outdir, name).unlink(missing_ok=True)
        found = ", ".join(f"{n} × {kind}" for kind, n in report["problem_counts"].items() if n) or "no images"
        raise InputError(f"{', '.join(map(str, annotation_files))}: no usable training image ({found}). Fix: check "
                         "that [dataset] images names the folder the file_name entries are relative to, one root "
                         "per annotation file, same order.")
    if workspace_root is not None:
        report["image_roots"] = [references[r] for r in report["image_roots"]]
        report["image_root_paths"] = {references[r]: r for r in references if references[r].startswith("images:")}
        report["annotation_files"] = [portable(r, workspace_root) for r in report["annotation_files"]]
        if karpathy_split:
            report["split_method"] = f"karpathy:{portable(karpathy_split, workspace_root)}"
    report["split_changes"] = {"previous": None}
    if previous is not None:
        changes = _split_changes(*manifests.split_assignment(previous), *assignment)
        report["split_changes"] = {"previous": Path(previous).name, **changes}
        (log.warning if changes["moved"] else log.info)(
            "annotations: %d of %d images also in the previous output (%s) changed split",
            changes["moved"], changes["compared_images"], Path(previous).name)
    manifests.write_json(Path(outdir) / manifests.REPORT_FILE, report)
    return report
