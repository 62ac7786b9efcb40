"""Reading COCO caption files and Karpathy split files as streams, with every problem of single entries
counted and listed (pipeline/problems.py) and a file whose structure is wrong refused with an InputError naming the file
and the field.

A file is read in blocks of bytes, one list item parsed at a time (_JsonFile), with the json module's own messages
and positions for a file that is not JSON; memory does not grow with the file.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from array import array
from pathlib import Path

import numpy as np

from pipeline import extensions
from pipeline.errors import InputError
from pipeline.problems import Problems
from pipeline.progress import Progress
from storage.manifests import SPLITS

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


def read_coco(path, on_image, on_annotation, problems: Problems, progress_callback=None) -> tuple[int, int]:
    """Stream one COCO captions file: on_image(image_id, file_name, fields) for each well-formed image entry
    (fields: what the plug-ins' parsers keep of it, extensions.image_fields), on_annotation(caption_id or None,
    image_id, caption) for each well-formed annotation, in file order; malformed entries (malformed_image,
    malformed_annotation, caption_not_a_string) and plug-in fields (malformed_image_field) go to `problems`.
    Returns how many of each were well-formed. The file's structure is checked strictly: InputError naming the
    file and the field. (Over 50 lines: the two entry checks are closures over the counters, the way the
    streaming reader calls them per item.)"""
    file, good, (low, high) = str(path), [0, 0], _INT64

    def skip(kind, where, i, reason, **more):
        problems.add(kind, {"file": file, "entry": f"{where}[{i}]", "reason": reason, **more})

    def image(i, entry):
        if type(entry) is dict:
            image_id, file_name = entry.get("id"), entry.get("file_name")
            if type(image_id) is int and low <= image_id <= high and type(file_name) is str:
                good[0] += 1
                fields, reasons = extensions.image_fields(entry) if extensions.IMAGE_FIELDS else ({}, [])
                for reason in reasons:   # the image stays; the field is dropped
                    skip("malformed_image_field", "images", i, reason, image_id=image_id)
                return on_image(image_id, file_name, fields)
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
    {"id", "file_name", …the fields of extensions.image_fields} and {"id" (or None), "image_id", "caption"}, and the malformed entries
    that were skipped {kind: [instance, …]} (malformed_image, malformed_annotation, caption_not_a_string; the first
    LISTED_PER_KIND of each kind).

    The file's structure is checked strictly — not JSON, or missing or wrongly typed top-level `images` /
    `annotations`: InputError naming the file. One bad entry among thousands is skipped and reported instead.
    Holds the whole file's entries: the stage itself streams (make_annotations)."""
    images, annotations, problems = [], [], Problems()
    read_coco(path, lambda image_id, name, fields: images.append({"id": image_id, "file_name": name, **fields}),
               lambda caption_id, image_id, caption: annotations.append({"id": caption_id, "image_id": image_id,
                                                                         "caption": caption}), problems)
    return images, annotations, problems.lists()


def load_karpathy_split(path: str | os.PathLike) -> dict[int, str]:
    """Karpathy's dataset_coco.json → {coco image id: 'train' | 'val' | 'test'} ('restval' counts as train)."""
    ids, codes, _ = karpathy_split_codes(path)
    return {image_id: SPLITS[code] for image_id, code in zip(ids.tolist(), codes.tolist())}


def karpathy_split_codes(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, sorted; the split of each as an index into SPLITS; the ids listed in more than one split) of a
    Karpathy split file, streamed. An id listed twice keeps its last split."""
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
    last_first, codes = np.frombuffer(ids, np.int64)[::-1], np.frombuffer(codes, np.int8)[::-1]
    unique, where = np.unique(last_first, return_index=True)
    pairs = np.unique(np.stack([last_first, codes.astype(np.int64)], axis=1), axis=0)
    listed, times = np.unique(pairs[:, 0], return_counts=True)
    return unique, codes[where], listed[times > 1]

