"""CIDEr-D as a training reward (self-critical training, pipeline/train.py), with corpus document frequencies.

pycocoevalcap's Cider computes its document frequencies from the captions it is asked to score, which is right
for an evaluation of a whole split but makes a batch's rewards depend on the batch. Self-critical training
(Rennie et al. 2017; self-critical.pytorch's CiderD with `cached_tokens = coco-train-idxs`) scores every sample
against document frequencies of the whole training corpus instead, computed once. The formula is pycocoevalcap's
CIDEr-D, to the same quirks (n = 1..4, σ = 6, the hypothesis' counts clipped to the reference's, the length taken
from the bigram count, × 10): scored against the corpus it was built from, `CiderD(refs).scores` equals
pycocoevalcap's per-image scores (tests/test_rewards.py).

Captions are the manifests' normalised strings (words separated by spaces). Pure python / numpy.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

N, SIGMA = 4, 6.0


def ngram_counts(caption: str) -> Counter:
    words = caption.split()
    return Counter(tuple(words[i:i + n]) for n in range(1, N + 1) for i in range(len(words) - n + 1))


class CiderD:
    """CIDEr-D against `references` {image_id: [captions]}, which are also the corpus of the document
    frequencies. `scores(image_ids, captions)` → one score per caption, against its image's references."""

    def __init__(self, references: dict):
        self.document_frequency = Counter()
        for refs in references.values():
            self.document_frequency.update({g for ref in refs for g in ngram_counts(ref)})
        self.log_documents = math.log(max(len(references), 1))
        self.references = {image_id: [self._vector(ngram_counts(ref)) for ref in refs]
                           for image_id, refs in references.items()}

    def _vector(self, counts: Counter):
        """tf-idf weights per n-gram length, their norms, and the length (pycocoevalcap's counts2vec)."""
        vec = [{} for _ in range(N)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (self.log_documents - math.log(max(1.0, self.document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, norms, length

    def score(self, image_id, caption: str) -> float:
        vec, norms, length = self._vector(ngram_counts(caption))
        refs = self.references[image_id]
        total = 0.0
        for ref_vec, ref_norms, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA ** 2))
            for n in range(N):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                if norms[n] and ref_norms[n]:
                    dot /= norms[n] * ref_norms[n]
                total += dot * penalty
        return 10.0 * total / N / max(len(refs), 1)

    def scores(self, image_ids, captions) -> np.ndarray:
        return np.array([self.score(i, c) for i, c in zip(image_ids, captions)], np.float32)
