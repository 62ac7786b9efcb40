"""The digits demo as one plug-in (`[dataset] plugins = pipeline.digits`, which configs/demo.cfg sets).

    demo.py         the built-in dataset: scenes of 1–4 handwritten digits (scikit-learn's) in COCO captions
                    format, with each image's digits and their boxes ([dataset] source = demo)
    scenes.py       the pretraining's scenes, the demo's and varied ones, and their per-cell labels
    pretrain.py     InceptionV3 pretrained on them, offline: the stand-in for ImageNet ([encoder] weights = digits)
    yardstick.py    the independent yardstick's renderer (other code, other parameters): tests/digit_yardstick.py's
                    dataset, and the pretraining report's held-out `yardstick_scenes`
    cell_scores.py  the feature extra `<layer>+cell_scores`: its per-cell head's 12 scores appended to the layer
    metrics.py      digits exact, count right, attention grounding; the digit reward; the image fields

register() adds them to the extension points of pipeline/extensions.py (the image fields, metrics and reward
named "digits", the feature extra "cell_scores"). The Luigi stages of the dataset and the weights are
tasks/demo.py. The general pipeline imports nothing from this package.
"""
from __future__ import annotations


def register() -> None:
    from pipeline import extensions
    from pipeline.digits import cell_scores, metrics

    extensions.IMAGE_FIELDS["digits"] = metrics.image_fields
    extensions.METRICS["digits"] = metrics.DigitMetrics()
    extensions.REWARDS["digits"] = ("digit reward", metrics.DigitReward.for_records)
    extensions.FEATURE_EXTRAS["cell_scores"] = cell_scores.EXTRA
