"""The plug-ins a config names (`[dataset] plugins`), loaded once per process, and the two extension points that
are stages (the library's own are in pipeline/extensions.py):

    DATASETS  [dataset] source → a Stage that writes a COCO-format dataset into its output directory:
              captions_{train,val,test}.json, images under {train,val,test}/, karpathy_split.json
    WEIGHTS   [encoder] weights → a Stage that makes an encoder weights file; its identity() is the weights
              identity extraction records (pipeline.encoder.stage_identity)

The demo registers one of each (tasks/demo.py)."""
from __future__ import annotations

from pipeline import extensions
from pipeline.errors import InputError

DATASETS: dict[str, type] = {}
WEIGHTS: dict[str, type] = {}


def load(names: list[str], config_files: str) -> list[str]:
    """Import and register each plug-in (pipeline.extensions.load); InputError naming the key and `config_files`
    when one cannot be imported."""
    for name in names:
        try:
            extensions.load([name])
        except ImportError as e:
            raise InputError(f"{config_files}: [dataset] plugins: cannot import {name} ({e}). Fix: name an "
                             "importable module with a register() function, as configs/demo.cfg does.") from e
    return names
