"""Extension points: what a kind of dataset adds to the general pipeline, registered by a plug-in.

A plug-in is a module named in `[dataset] plugins` whose register() adds what it brings to these registries (the
built-in demo is one: configs/demo.cfg names it). The general modules ask these registries and never import a plug-in,
so a dataset that names none runs the plain Show-Attend-Tell pipeline.

    image_fields     per-image truth an annotation file may carry beside COCO's keys: a parser of one `images`
                     entry → (the keys the split manifests keep for that image ({} when it carries none), why a
                     field it names is malformed and dropped, or None: the annotations report lists it)
    metrics          a Metrics object: scores of captions against that truth, in the metrics file, its report,
                     the log and TensorBoard; its val scores are what [training] select_by may name
    rewards          a self-critical reward by name ([training] scst_reward): factory(train records) → an object
                     whose scores(image_ids, captions) gives one float per caption
    feature_extras   channels appended to every cell of a feature layer ([encoder] layer = <layer>+<name>): a
                     FeatureExtra saying how many, which weights provide them, and how the encoder computes them

Two more live in the Luigi wiring, since they are stages (tasks/plugins.py): a dataset source that writes a
COCO-format dataset ([dataset] source), and encoder weights made by a stage ([encoder] weights).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

IMAGE_FIELDS: dict[str, Callable[[dict], tuple[dict, str | None]]] = {}
METRICS: dict[str, "Metrics"] = {}
REWARDS: dict[str, tuple[str, Callable]] = {}
FEATURE_EXTRAS: dict[str, "FeatureExtra"] = {}


class Metrics:
    """Scores of a split's captions against a dataset's per-image truth (records: the split manifest's, with the
    keys the plug-in's image fields kept). `name` is the key of its block in the metrics file; `labels` names
    the block's scores for tables ({key: label}, in order); `val_labels` the val scores an epoch may be selected
    by ({key: label}, CIDEr-D breaking ties)."""
    name: str = ""
    labels: dict[str, str] = {}
    val_labels: dict[str, str] = {}
    truth_key: str = ""   # the `images` entry key that declares the truth (found in a file before any work)

    def declares(self, records) -> bool:
        """Whether any record carries this truth (no truth: no block, no val score, never a 0)."""
        raise NotImplementedError

    def evaluate(self, hypotheses: dict, records: dict, attention: dict) -> dict | None:
        """The metrics file's block for {image_id: caption} (attention: storage.shards.read_all_attention of
        the split), or None when the records declare no truth."""
        raise NotImplementedError

    def per_image(self, caption: str, record: dict) -> dict:
        """Keys added to one image's per-image scores."""
        return {}

    def describe(self, caption: str, record: dict) -> str:
        """A line under the image in the HTML report ('' for none)."""
        return ""

    def note(self, block: dict) -> str:
        """What the block's scores count, for the HTML report."""
        return ""

    def val_scores(self, hypotheses: dict, records: dict) -> dict:
        """{key of val_labels: score or None} of an epoch's val captions."""
        return {}


@dataclass(frozen=True)
class FeatureExtra:
    """`channels` appended to each cell of the base layer; `weights`: the [encoder] weights that provide them;
    build(identity, layer, grid) → a Keras tensor (B, g, g, channels) computed from the base layer's grid
    (B, g, g, D) with the weights of `identity`; file(identity) → the file its parameters come from (its sha256
    is recorded in every shard, as `extra_sha256`)."""
    channels: int
    weights: str
    build: Callable
    file: Callable


def load(modules) -> None:
    """Import each plug-in module and call its register() (once per process)."""
    for name in modules:
        if name not in _loaded:
            importlib.import_module(name).register()
            _loaded.add(name)


_loaded: set[str] = set()


def image_fields(entry: dict) -> tuple[dict, list[str]]:
    """The manifest keys every registered parser keeps from one `images` entry of an annotation file, and why
    the fields they dropped are malformed."""
    fields, problems = {}, []
    for parse in IMAGE_FIELDS.values():
        kept, problem = parse(entry)
        fields.update(kept)
        problems += [problem] if problem else []
    return fields, problems


def val_labels() -> dict[str, str]:
    """{val score key: label} of every registered Metrics: what [training] select_by may name besides cider."""
    return {key: label for m in METRICS.values() for key, label in m.val_labels.items()}


def metrics_for(score: str) -> "Metrics | None":
    """The registered Metrics whose val scores include `score`."""
    return next((m for m in METRICS.values() if score in m.val_labels), None)
