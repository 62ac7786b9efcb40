"""The feature extra `cell_scores` (`[encoder] layer = <layer>+cell_scores`, weights = digits): the digits
encoder's per-cell head output appended to each cell of its layer.

    grid (B, g, g, D) → Dense(11, softmax) with the head's kernel (D, 11) and bias → (B, g, g, 11)

11 probabilities per cell (digits 0–9, background): the 1×1 convolution the pretraining (pretrain.py) trained to
name what lies under that cell, saved beside the InceptionV3 weights (storage.weights.CELL_HEAD_FILE). Local by
construction, they let the decoder's attention keys find the digits (`[decoder] attention_keys = extras`).
Probabilities, not logits: a background cell's digit logits still vary with the digit beside it, and the
decoder's per-channel standardisation magnifies that.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.extensions import FeatureExtra
from storage.weights import CELL_HEAD_FILE, read_cell_head

CLASSES = 11   # digits 0–9, background


def head_file(identity: dict) -> Path:
    """The head file beside the digits encoder's weights file."""
    return Path(identity["path"]).parent / CELL_HEAD_FILE


def build(identity: dict, layer: str, grid):
    """The cell scores of the base layer's `grid` (B, g, g, D): (B, g, g, 11)."""
    import keras

    kernel, bias, _ = read_cell_head(head_file(identity))
    head = keras.layers.Dense(len(bias), activation="softmax", name="cell_scores")
    scores = head(grid)
    head.set_weights([kernel, bias])
    return scores


EXTRA = FeatureExtra(channels=CLASSES, weights="digits", build=build, file=head_file)
