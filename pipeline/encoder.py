"""InceptionV3 image encoder: weights resolution (imagenet | weights file | random:<seed>) and model building.

    uint8 images (B, S, S, 3) → inception_v3.preprocess_input (x / 127.5 − 1) → InceptionV3(include_top=False)
    → `layer` (B, S', S', D) → features (B, S'·S', D), positions row-major. At S = 299:
      mixed10  the last block (the TF tutorial's features): 8×8 = 64 positions of D = 2048;
      mixed7   the last 17×17 block: 289 positions of D = 768, cells 16 px apart instead of 32 (the network
               above it is not run). Show, Attend and Tell used a 14×14 grid (VGG conv5).

Weights:
  imagenet       Keras' cached file ~/.keras/models/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5
                 ($KERAS_HOME/models when set), downloaded by Keras when missing and online.
  /path/file.h5  a weights file for InceptionV3(include_top=False): a Keras `.weights.h5` or legacy `.h5`.
  digits         InceptionV3 pretrained here, offline, on scikit-learn's handwritten digits (pipeline/pretrain.py,
                 Luigi stage PretrainDigitsEncoder): the demo's stand-in for ImageNet. Identified by the
                 pretraining stage's fingerprint; the file's sha256 is recorded in every shard as well.
  random:<seed>  no pretrained weights, for tests only (its features barely differ between images, so captions
                 trained on them mean nothing): the InceptionV3 architecture with every
                 convolution kernel drawn He-normal (std √(2 / fan_in)) from numpy's generator seeded with
                 <seed>, batch norms at identity. He scaling keeps activations O(1) through the 94 ReLU
                 layers (Keras' default Glorot init shrinks mixed10 to ~1e-4, useless in float16).
The weights identity (sha256 of the file, or the seed) is part of the encoder fingerprint and every shard.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from storage.weights import CELL_HEAD_FILE, read_cell_head, weights_file_problem
from storage.workspace import file_sha256

IMAGENET_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
# where keras.applications.InceptionV3 downloads it from (keras 3.x: keras/src/applications/inception_v3.py)
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/" + IMAGENET_FILE)
# The feature layers `[encoder] layer` offers: their channels, how many stride-2 reduction blocks (mixed3,
# mixed8) lie between the stem and them, and where cell k of their grid is centred on the input (offset +
# stride·k pixels: InceptionV3's strided layers are 'valid', so the grid does not span the input).
LAYERS = {"mixed10": {"channels": 2048, "reductions": 2, "stride": 32, "offset": 37.5},
          "mixed7": {"channels": 768, "reductions": 1, "stride": 16, "offset": 21.5}}
# `<layer>+cell_scores` (weights = digits only): the layer's features, then the digits encoder's per-cell head
# output appended to each cell: 11 probabilities (digits 0–9, background; a softmax of the 1×1 convolution its
# pretraining trained to name what lies under that cell, storage.weights.CELL_HEAD_FILE). Local by construction,
# they let the decoder's attention keys find the digits (`[decoder] attention_keys = cell_scores`). Probabilities,
# not logits: a background cell's digit logits still vary with the digit beside it, and the decoder's per-channel
# standardisation magnifies that.
CELL_SCORES = 11
LAYERS.update({f"{name}+cell_scores": {**spec, "channels": spec["channels"] + CELL_SCORES, "base": name,
                                       "cell_scores": CELL_SCORES} for name, spec in list(LAYERS.items())})
DEFAULT_LAYER = "mixed10"
# [encoder] precision → the Keras dtype policy the network is built under (weights stay float32)
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
PREPROCESS = "pillow bilinear resize to SxS (no crop), x/127.5-1 (inception_v3.preprocess_input)"
_NAME_PREFIX = "keras.applications.InceptionV3(include_top=False)/"
DIGITS_PROVENANCE = "pretrained on scikit-learn handwritten digits (pipeline/pretrain.py), not ImageNet"


def keras_cache_file() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models" / IMAGENET_FILE


def encoder_name(layer: str = DEFAULT_LAYER) -> str:
    """What the features are, as recorded in the store's fingerprint, its shards and the models trained on it."""
    return _NAME_PREFIX + layer


def layer_of(name: str) -> str | None:
    """The layer of an encoder_name(), or None when `name` is not one this version extracts."""
    layer = name[len(_NAME_PREFIX):] if name.startswith(_NAME_PREFIX) else None
    return layer if layer in LAYERS else None


def grid_size(image_size: int, layer: str = DEFAULT_LAYER) -> int:
    """Side of InceptionV3's grid at `layer` for an S×S input: at 299, 8 for mixed10 and 17 for mixed7 (its
    strided layers are all 'valid')."""
    s = (image_size - 3) // 2 + 1       # conv 3×3 stride 2
    s = s - 2                           # conv 3×3
    s = (s - 3) // 2 + 1                # max-pool 3×3 stride 2
    s = s - 2                           # conv 3×3
    s = (s - 3) // 2 + 1                # max-pool 3×3 stride 2
    for _ in range(LAYERS[layer]["reductions"]):
        s = (s - 3) // 2 + 1            # mixed3 reduction (→ mixed4 … mixed7), mixed8's (→ mixed8 … mixed10)
    return s


def grid_side(positions: int) -> int:
    """Side of the square grid of `positions` attention positions (64 → 8); ValueError when not square."""
    side = int(round(positions ** 0.5))
    if side * side != positions:
        raise ValueError(f"{positions} attention positions are not a square grid")
    return side


def cell_centres(side: int, layer: str = DEFAULT_LAYER) -> np.ndarray:
    """Input pixel on which each of the side cells of a row (or column) of `layer` is centred: offset + stride·k."""
    return LAYERS[layer]["offset"] + LAYERS[layer]["stride"] * np.arange(side)


def cell_edges(side: int, layer: str = DEFAULT_LAYER) -> list[float]:
    """Where the side × side cells of `layer` lie on the (squashed, square) input, as fractions 0..1 of its side.

    InceptionV3's strided layers are 'valid', so cell k is centred on input pixel offset + stride·k (LAYERS) of
    the smallest input with that grid (S = stride·side + 2·offset − stride: 299 for mixed10's 8×8 and mixed7's
    17×17), not on (k + ½)·S/side: at 299 px mixed10's centres run from 37.5 to 261.5. Each cell owns the
    input up to the midpoints between neighbouring centres (the first and last cells reach the borders). Used by
    the attention pictures and attention grounding."""
    stride, offset = LAYERS[layer]["stride"], LAYERS[layer]["offset"]
    size = stride * side + 2 * offset - stride
    centres = cell_centres(side, layer).tolist()
    middles = [(a + b) / 2 / size for a, b in zip(centres, centres[1:])]
    return [0.0, *middles, 1.0]


def resolve_weights(spec: str) -> dict:
    """Config value → weights identity: {"weights": "imagenet"|"file"|"random", "path"?, "sha256"?, "seed"?}.
    Raises InputError naming the missing file and the alternatives."""
    spec = spec.strip()
    if spec.startswith("random:"):
        try:
            return {"weights": "random", "seed": int(spec.split(":", 1)[1]), "init": "he_normal"}
        except ValueError:
            raise InputError(f"[encoder] weights = {spec!r}: the seed after 'random:' must be an integer, "
                             "e.g. random:0.") from None
    if spec == "imagenet":
        path = keras_cache_file()
        if not path.is_file():
            _download_imagenet(path)
        return {"weights": "imagenet", "path": str(path), "sha256": file_sha256(path)}
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"[encoder] weights = {spec!r}: no such file {path}. Fix: give the path of an "
                         "InceptionV3 (include_top=False) weights .h5 file, or 'imagenet' (Keras' cached file), "
                         "'digits' (digit images only) or 'random:<seed>' (tests only).")
    problem = weights_file_problem(path)
    if problem:
        raise InputError(f"[encoder] weights = {spec!r}: {path} {problem}. Fix: give the path of an InceptionV3 "
                         "(include_top=False) weights .h5 file, or 'imagenet' (Keras' cached file), 'digits' "
                         "(digit images only) or 'random:<seed>' (tests only).")
    return {"weights": "file", "path": str(path), "sha256": file_sha256(path)}


def digits_identity(path, pretrain_fingerprint: str) -> dict:
    """The identity of the built-in digits encoder: the pretraining stage's fingerprint (known before the file
    exists, so Luigi can plan the feature store) and where its weights file is (or will be)."""
    return {"weights": "digits", "pretrain": pretrain_fingerprint, "path": str(path),
            "pretrained_on": DIGITS_PROVENANCE}


def _download_imagenet(path: Path) -> None:
    import keras

    try:
        keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models",
                             cache_dir=str(path.parent.parent), file_hash="bcbd6486424b2319ff4ef7d526e38f63")
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(
            f"[encoder] weights = imagenet: the ImageNet weights file {path} is missing and could not be "
            f"downloaded ({reason}). Fix, on a machine without internet: on one that has it, download "
            f"{IMAGENET_URL} (Keras' InceptionV3 no-top weights, md5 bcbd6486424b2319ff4ef7d526e38f63; "
            "`python -c \"import keras; keras.applications.InceptionV3(include_top=False)\"` fetches it into "
            f"~/.keras/models/), copy it to {path} (or $KERAS_HOME/models/{IMAGENET_FILE}), or set [encoder] "
            "weights to its path. For digit images only, weights = digits pretrains an encoder here, offline. "
            "random:<seed> is for tests: its features barely differ between images and its captions mean "
            "nothing.") from e


def weights_attrs(identity: dict) -> dict:
    """The weights identity as flat HDF5 attrs."""
    out = {"weights": identity["weights"]}
    if "sha256" in identity:
        out.update(weights_sha256=identity["sha256"], weights_path=identity["path"])
    if identity["weights"] == "digits":
        out.update(weights_sha256=file_sha256(identity["path"]), weights_path=identity["path"],
                   pretrain=identity["pretrain"], pretrained_on=identity["pretrained_on"])
    if "seed" in identity:
        out.update(seed=identity["seed"], weights_init=identity["init"])
    return out


def build_inception(identity: dict, image_size: int):
    """keras.applications.InceptionV3(include_top=False) at S×S with the weights of `identity`."""
    import keras

    path = identity.get("path") if identity["weights"] != "random" else None
    model = keras.applications.InceptionV3(include_top=False, weights=path,
                                           input_shape=(image_size, image_size, 3))
    if identity["weights"] == "random":
        rng = np.random.default_rng(identity["seed"])
        for layer in model.layers:
            if isinstance(layer, keras.layers.Conv2D):
                shape = tuple(layer.kernel.shape)
                fan_in = int(np.prod(shape[:3]))
                layer.kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))
    return model


def truncated(inception, layer: str):
    """InceptionV3 ending at `layer` (the blocks above it are not run)."""
    import keras

    if layer == inception.layers[-1].name:
        return inception
    return keras.Model(inception.input, inception.get_layer(layer).output, name=f"inception_v3_{layer}")


def base_layer(layer: str) -> str:
    """The InceptionV3 layer a LAYERS entry reads: `mixed7` for both mixed7 and mixed7+cell_scores."""
    return LAYERS[layer].get("base", layer)


def cell_head_file(identity: dict, layer: str) -> Path:
    """The per-cell head file whose scores `layer` (a `+cell_scores` layer) appends; InputError for weights other
    than digits, which have no such head."""
    if identity["weights"] != "digits":
        raise InputError(f"[encoder] layer = {layer} appends the per-cell digit scores of the digits encoder's "
                         f"pretraining head, and [encoder] weights is {identity['weights']!r}. Fix: set weights = "
                         f"digits, or layer = {base_layer(layer)}.")
    return Path(identity["path"]).parent / CELL_HEAD_FILE


def build_encoder(identity: dict, image_size: int, layer: str = DEFAULT_LAYER, precision: str = "float32"):
    """uint8 (B, S, S, 3) → (B, P, D) Keras model (P = grid_size(S, layer)², D = the layer's channels; a
    `+cell_scores` layer: the base layer's channels, then its cell head's scores), computing in `precision`
    (PRECISIONS: its output is float32, or bfloat16 / float16 under reduced precision)."""
    import keras

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(PRECISIONS[precision])   # layers take the policy they are built under
    try:
        return _build_encoder(identity, image_size, layer)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _build_encoder(identity: dict, image_size: int, layer: str):
    import keras

    head_file = cell_head_file(identity, layer) if LAYERS[layer].get("cell_scores") else None
    inception = truncated(build_inception(identity, image_size), base_layer(layer))
    images = keras.Input((image_size, image_size, 3), dtype="uint8", name="images")
    x = keras.applications.inception_v3.preprocess_input(keras.ops.cast(images, "float32"))
    grid = inception(x, training=False)
    if head_file is not None:
        kernel, bias, _ = read_cell_head(head_file)
        head = keras.layers.Dense(len(bias), activation="softmax", name="cell_scores")
        scores = head(grid)
        head.set_weights([kernel, bias])
        grid = keras.layers.Concatenate(name="features_and_scores")([grid, scores])
    features = keras.layers.Reshape((-1, LAYERS[layer]["channels"]), name="positions")(grid)
    return keras.Model(images, features, name="encoder")
