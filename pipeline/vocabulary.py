"""Stage 2: the vocabulary, counted on the training split only (streamed: memory for the counts, not the
captions), and caption ⇄ token-id conversion.

Ids: <pad> = 0, <start> = 1, <end> = 2, <unk> = 3, then words by count descending, ties alphabetical.
A word is kept when its training count ≥ min_count; max_size (when > 0) caps the total size, specials included.

Caption length policy (applied everywhere a caption becomes ids): a caption has at most `max_length` words
(<start>/<end> not counted). `length_policy = truncate` keeps its first max_length words; `drop` leaves the
caption out of training (encode returns None). References for evaluation are never truncated.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from itertools import repeat

import numpy as np

from storage import manifests

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
LENGTH_POLICIES = ("truncate", "drop")
FORMAT = "captioner-vocabulary/1"
log = logging.getLogger("captioner")


def count_words(records) -> Counter:
    """Word counts over every (normalised) caption of the manifest records given."""
    counts = Counter()
    for record in records:
        for caption in record["captions"]:
            counts.update(caption.split())
    return counts


def build_vocabulary(train_records, min_count: int = 5, max_size: int = 0, max_length: int = 20,
                     length_policy: str = "truncate") -> dict:
    """The vocabulary artifact (a JSON-ready dict) from the training manifest records."""
    return vocabulary_of((record["captions"] for record in train_records), min_count, max_size, max_length,
                         length_policy)


def vocabulary_of(caption_lists, min_count: int = 5, max_size: int = 0, max_length: int = 20,
                  length_policy: str = "truncate") -> dict:
    """The vocabulary artifact from the normalised captions of each training image (an iterable of lists, read
    once: a manifest streamed by storage.manifests.iter_captions holds only a batch of captions in memory)."""
    if length_policy not in LENGTH_POLICIES:
        raise ValueError(f"length_policy must be one of {LENGTH_POLICIES}, got {length_policy!r}")
    counts, lengths, n_images = _count(caption_lists)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    words = [w for w, c in ranked if c >= min_count and w not in SPECIALS]
    if max_size > 0:
        words = words[:max(max_size - len(SPECIALS), 0)]
    total = sum(counts.values())
    n_captions = sum(lengths.values())
    return {
        "format": FORMAT,
        "tokens": list(SPECIALS) + words,
        "counts": {w: counts[w] for w in words},
        "special": {"pad": 0, "start": 1, "end": 2, "unk": 3},
        "settings": {"min_count": min_count, "max_size": max_size, "max_length": max_length,
                     "length_policy": length_policy},
        "stats": {
            "train_images": n_images,
            "train_captions": n_captions,
            "distinct_words": len(counts),
            "words_kept": len(words),
            "token_coverage": round(sum(counts[w] for w in words) / total, 6) if total else 0.0,
            "captions_longer_than_max_length": sum(c for n, c in lengths.items() if n > max_length),
            "caption_length_mean": round(sum(n * c for n, c in lengths.items()) / n_captions, 3) if n_captions
            else 0.0,
            "caption_length_max": max(lengths, default=0),
        },
    }


def _count(caption_lists) -> tuple[Counter, Counter, int]:
    """(word counts, {caption length in words: captions}, images) of the captions, a batch at a time."""
    counts, lengths, n_images, batch = Counter(), Counter(), 0, []

    def count(batch):
        text = " ".join(batch)
        words = text.split()
        counts.update(words)
        if (len(words) == text.count(" ") + 1 and "  " not in text and text[:1] != " " != text[-1:]
                and text.isprintable()):   # single spaces between words, no other whitespace: words = spaces + 1
            for spaces, n in Counter(map(str.count, batch, repeat(" "))).items():
                lengths[spaces + 1] += n
        else:
            lengths.update(map(len, map(str.split, batch)))

    for captions in caption_lists:
        n_images += 1
        batch += captions
        if len(batch) >= 65536:
            count(batch)
            batch = []
    count(batch)
    return counts, lengths, n_images


class Vocabulary:
    """Caption ⇄ ids for one vocabulary artifact."""

    def __init__(self, artifact: dict):
        self.artifact = artifact
        self.tokens: list[str] = artifact["tokens"]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.max_length: int = artifact["settings"]["max_length"]
        self.length_policy: str = artifact["settings"]["length_policy"]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        return cls(manifests.read_json(path))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, caption: str) -> list[int] | None:
        """Normalised caption → [<start>, ids..., <end>] with unknown words as <unk>; None when the
        length policy drops it."""
        words = caption.split()
        if len(words) > self.max_length:
            if self.length_policy == "drop":
                return None
            words = words[:self.max_length]
        unk = self.index[UNK]
        return [self.index[START]] + [self.index.get(w, unk) for w in words] + [self.index[END]]

    def encode_batch(self, captions, pad_to: int | None = None) -> np.ndarray:
        """Encode and pad with <pad> (0) to the longest caption given (or `pad_to`).
        Returns int32 (n, T) with T = longest + 2. Captions dropped by the policy are left out."""
        encoded = [ids for ids in map(self.encode, captions) if ids is not None]
        width = pad_to or max((len(ids) for ids in encoded), default=2)
        out = np.zeros((len(encoded), width), dtype=np.int32)
        for row, ids in enumerate(encoded):
            out[row, :len(ids)] = ids[:width]
        return out

    def decode(self, ids) -> str:
        """Ids → caption: stops at <end>, skips <start> and <pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.index[END]:
                break
            if i in (self.index[START], self.index[PAD]):
                continue
            words.append(self.tokens[i])
        return " ".join(words)


def make_vocabulary(annotations_dir: str | os.PathLike, outdir: str | os.PathLike, **settings) -> dict:
    """Stage 2 entry point: count the train manifest of `annotations_dir`, write `outdir`/vocab.json."""
    artifact = vocabulary_of(manifests.iter_captions(manifests.manifest_path(annotations_dir, "train")), **settings)
    manifests.write_json(os.path.join(outdir, manifests.VOCAB_FILE), artifact)
    stats = artifact["stats"]
    log.info("vocabulary: %d tokens (%d of %d distinct words kept, min_count %d), %.2f%% of train tokens covered",
             len(artifact["tokens"]), stats["words_kept"], stats["distinct_words"], settings.get("min_count", 0),
             100 * stats["token_coverage"])
    if stats["train_captions"] and stats["caption_length_mean"] < 2:
        log.warning("vocabulary: train captions average %.2f words: words are split at spaces, so a caption "
                    "written without them (Chinese, Japanese, Thai) is one token. Fix: put spaces between its "
                    "words (a word segmenter) in the caption files", stats["caption_length_mean"])
    if stats["captions_longer_than_max_length"]:
        s = artifact["settings"]
        log.warning("vocabulary: %d of %d train captions are longer than [vocabulary] max_length = %d words (the "
                    "longest %d): training %s", stats["captions_longer_than_max_length"], stats["train_captions"],
                    s["max_length"], stats["caption_length_max"],
                    "drops them" if s["length_policy"] == "drop" else "keeps their first words")
    return artifact
