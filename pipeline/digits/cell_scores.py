"""The feature extra `cell_scores` (`[encoder] layer = <layer>+cell_scores`, weights = digits): the digits
encoder's per-cell head output appended to each cell of its layer.

    grid (B, g, g, D) → Dense(12) with the head's kernel (D, 12) and bias → softmax of the first 11,
                                                                         sigmoid of the last → (B, g, g, 12)

11 probabilities per cell (digits 0–9, background), then the probability that a digit's centre lies in it: the
1×1 convolution the pretraining (pretrain.py) trained to name what lies under that cell and to mark each digit's
centre, saved beside the InceptionV3 weights (storage.weights.CELL_HEAD_FILE). Local by construction, they let the
decoder's attention keys find the digits (`[decoder] attention_keys = extras`), and the centres tell two alike
digits side by side from one wide one.
Probabilities, not logits: a background cell's digit logits still vary with the digit beside it, and the
decoder's per-channel standardisation magnifies that.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.extensions import FeatureExtra
from storage.weights import CELL_HEAD_FILE, read_cell_head

CLASSES = 11   # digits 0–9, background
CHANNELS = CLASSES + 1   # and a digit's centre


def head_file(identity: dict) -> Path:
    """The head file beside the digits encoder's weights file."""
    return Path(identity["path"]).parent / CELL_HEAD_FILE


def build(identity: dict, layer: str, grid):
    """The cell scores of the base layer's `grid` (B, g, g, D): (B, g, g, 12)."""
    import keras

    kernel, bias, _ = read_cell_head(head_file(identity))
    if len(bias) != CHANNELS:
        raise ValueError(f"{head_file(identity)} has {len(bias)} outputs, not {CHANNELS} (classes and centre): "
                         "it was written by an older pretraining. Fix: delete its encoders/ directory and rerun")
    head = keras.layers.Dense(CHANNELS, name="cell_scores")
    logits = head(grid)
    head.set_weights([kernel, bias])
    return keras.ops.concatenate([keras.ops.softmax(logits[..., :CLASSES]), keras.ops.sigmoid(logits[..., CLASSES:])],
                                 axis=-1)


EXTRA = FeatureExtra(channels=CHANNELS, weights="digits", build=build, file=head_file)
