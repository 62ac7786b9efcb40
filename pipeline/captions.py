"""Caption text: the normalisation rule every caption goes through (documented in the README), its tokens,
and caption diversity.

Normalisation rule:
  1. Unicode NFKC, typographic apostrophes (’ ‘ ʼ) become ', then lowercase;
  2. every character that is not alphanumeric or an apostrophe becomes a space
     (so "left-to-right," → "left to right");
  3. an apostrophe survives only between two alphanumeric characters ("man's" stays, "dogs'" → "dogs");
  4. whitespace runs collapse to one space; leading/trailing space is removed.
Tokens are the space-separated words of the normalised caption.
"""
from __future__ import annotations

import re
import unicodedata

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_NOT_WORD = re.compile(r"[^\w']|_")
_LOOSE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
# the same on text where only a-z 0-9 ' remain, as an apostrophe then a look back (so re searches for ' alone)
_LOOSE_APOSTROPHE_ASCII = re.compile(rb"'(?:(?<![a-z0-9]')|(?![a-z0-9]))")
_SPACE_RUNS = re.compile(rb"  +")
# steps 1-2 of the rule for ASCII text (NFKC leaves ASCII alone): letters lowercased, 0-9 and ' kept, ` → ',
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



def distinct_captions(hypotheses: dict) -> int:
    """How many different captions (after normalisation) a model produced for {image_id: caption}: a collapsed
    model says the same thing for every image."""
    return len({normalize_caption(c) for c in hypotheses.values()})


def normalised_lines(captions: list[str]) -> list[bytes]:
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

