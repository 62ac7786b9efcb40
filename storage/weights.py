"""Encoder weights files (.h5): a cheap structural check, so a wrong file is refused when the encoder is
resolved (during planning, with the config key named) instead of failing later in every shard task.

InceptionV3(include_top=False) has 376 weight arrays: 94 convolution kernels (no biases) and 94 batch norms of
3 arrays each (beta, moving mean, moving variance; no scale). Keras 3 `.weights.h5` files and Keras 2 `.h5`
weight files (the ImageNet download) both store them as 376 HDF5 datasets.
"""
from __future__ import annotations

import os

import h5py

INCEPTION_V3_NO_TOP_ARRAYS = 376


def weights_file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be InceptionV3 (include_top=False) weights, or None when it looks right."""
    if not h5py.is_hdf5(path):
        return "is not an HDF5 file"
    arrays = []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, item: arrays.append(name) if isinstance(item, h5py.Dataset) else None)
    except OSError as e:
        return f"cannot be read as HDF5 ({e})"
    if len(arrays) != INCEPTION_V3_NO_TOP_ARRAYS:
        return (f"holds {len(arrays)} weight arrays, and InceptionV3 without its top has "
                f"{INCEPTION_V3_NO_TOP_ARRAYS} (is it another network, or include_top=True?)")
    return None


# A per-cell head: the 1×1 convolution a pretraining trained to name the class under each cell of its feature
# layer, saved beside the InceptionV3 weights (the demo's encoder has one; a feature extra may append its output,
# pipeline/extensions.py).
CELL_HEAD_FILE = "cell_head.h5"


def write_cell_head(path, kernel, bias, layer: str, classes: list[str]) -> None:
    """kernel (D, K) float32, bias (K,): scores = features (…, D) @ kernel + bias, one per class."""
    with h5py.File(path, "w") as f:
        f.create_dataset("kernel", data=kernel.astype("float32"))
        f.create_dataset("bias", data=bias.astype("float32"))
        f.attrs["layer"] = layer
        f.attrs["classes"] = ",".join(classes)


def read_cell_head(path) -> tuple:
    """(kernel (D, K), bias (K,), layer) of a cell head file."""
    with h5py.File(path, "r") as f:
        return f["kernel"][:], f["bias"][:], str(f.attrs["layer"])
