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
  <name>         weights a plug-in's stage makes here, offline (tasks/plugins.py WEIGHTS; the demo has one): a file
                 identified by that stage's fingerprint; its sha256 is recorded in every shard as well.
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

from pipeline import extensions
from pipeline.errors import InputError
from storage.weights import weights_file_problem
from storage.workspace import file_sha256

IMAGENET_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
# where keras.applications.InceptionV3 downloads it from (keras 3.x: keras/src/applications/inception_v3.py)
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/" + IMAGENET_FILE)
# The feature layers `[encoder] layer` offers: their channels, how many stride-2 reduction blocks (mixed3,
# mixed8) lie between the stem and them, and where cell k of their grid is centred on the input (offset +
# stride·k pixels: InceptionV3's strided layers are 'valid', so the grid does not span the input).
LAYERS = {"mixed10": {"channels": 2048, "reductions": 2, "stride": 32, "offset": 37.5},
          "mixed7": {"channels": 768, "reductions": 1, "stride": 16, "offset": 21.5}}
# `<layer>+<extra>`: the layer's features, then the channels a plug-in's feature extra appends to each cell
# (pipeline/extensions.py FeatureExtra; the decoder can take its attention keys from them alone:
# `[decoder] attention_keys = extras`).
DEFAULT_LAYER = "mixed10"
# [encoder] precision → the Keras dtype policy the network is built under (weights stay float32)
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
PREPROCESS = "pillow bilinear resize to SxS (no crop), x/127.5-1 (inception_v3.preprocess_input)"
_NAME_PREFIX = "keras.applications.InceptionV3(include_top=False)/"


def keras_cache_file() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models" / IMAGENET_FILE


def encoder_name(layer: str = DEFAULT_LAYER) -> str:
    """What the features are, as recorded in the store's fingerprint, its shards and the models trained on it."""
    return _NAME_PREFIX + layer


def layer_of(name: str) -> str | None:
    """The layer of an encoder_name(), or None when `name` is not one this version extracts."""
    layer = name[len(_NAME_PREFIX):] if name.startswith(_NAME_PREFIX) else None
    return layer if layer is not None and layer_problem(layer) is None else None


def layer_spec(layer: str) -> dict:
    """LAYERS' entry of `layer`; for `<base>+<extra>`, the base's with the extra's channels added ("channels"),
    and "base", "extra", "extra_channels". KeyError for a layer or extra nobody offers (layer_problem)."""
    base, _, extra = layer.partition("+")
    spec = dict(LAYERS[base])
    if extra:
        channels = extensions.FEATURE_EXTRAS[extra].channels
        spec.update(channels=spec["channels"] + channels, base=base, extra=extra, extra_channels=channels)
    return spec


def layer_problem(layer: str) -> str | None:
    """Why `layer` is not a feature layer this process can extract (None when it is)."""
    base, _, extra = layer.partition("+")
    if base not in LAYERS:
        return f"is not a feature layer: use one of {', '.join(LAYERS)}"
    if extra and extra not in extensions.FEATURE_EXTRAS:
        offered = ", ".join(f"{base}+{name}" for name in extensions.FEATURE_EXTRAS) or "none"
        return (f"appends '{extra}', which no plug-in of [dataset] plugins offers (offered: {offered}); add the "
                f"plug-in that provides it to [dataset] plugins, or use {base}")
    return None


def grid_size(image_size: int, layer: str = DEFAULT_LAYER) -> int:
    """Side of InceptionV3's grid at `layer` for an S×S input: at 299, 8 for mixed10 and 17 for mixed7 (its
    strided layers are all 'valid')."""
    s = (image_size - 3) // 2 + 1       # conv 3×3 stride 2
    s = s - 2                           # conv 3×3
    s = (s - 3) // 2 + 1                # max-pool 3×3 stride 2
    s = s - 2                           # conv 3×3
    s = (s - 3) // 2 + 1                # max-pool 3×3 stride 2
    for _ in range(LAYERS[base_layer(layer)]["reductions"]):
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
    spec = LAYERS[base_layer(layer)]
    return spec["offset"] + spec["stride"] * np.arange(side)


def cell_edges(side: int, layer: str = DEFAULT_LAYER) -> list[float]:
    """Where the side × side cells of `layer` lie on the (squashed, square) input, as fractions 0..1 of its side.

    InceptionV3's strided layers are 'valid', so cell k is centred on input pixel offset + stride·k (LAYERS) of
    the smallest input with that grid (S = stride·side + 2·offset − stride: 299 for mixed10's 8×8 and mixed7's
    17×17), not on (k + ½)·S/side: at 299 px mixed10's centres run from 37.5 to 261.5. Each cell owns the
    input up to the midpoints between neighbouring centres (the first and last cells reach the borders). Used by
    the attention pictures and attention grounding."""
    stride, offset = LAYERS[base_layer(layer)]["stride"], LAYERS[base_layer(layer)]["offset"]
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
                         "a plug-in's weights, or 'random:<seed>' (tests only).")
    problem = weights_file_problem(path)
    if problem:
        raise InputError(f"[encoder] weights = {spec!r}: {path} {problem}. Fix: give the path of an InceptionV3 "
                         "(include_top=False) weights .h5 file, or 'imagenet' (Keras' cached file), a plug-in's "
                         "weights, or 'random:<seed>' (tests only).")
    return {"weights": "file", "path": str(path), "sha256": file_sha256(path)}


def stage_identity(name: str, path, stage_fingerprint: str, provenance: str) -> dict:
    """The identity of weights a stage makes (`[encoder] weights = <name>`, a plug-in's): that stage's
    fingerprint (known before the file exists, so Luigi can plan the feature store), where its weights file is
    (or will be), and what they were trained on."""
    return {"weights": name, "stage": stage_fingerprint, "path": str(path), "pretrained_on": provenance}


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
            "weights to its path. A plug-in may make weights here, offline (the built-in demo's, for its kind of "
            "images only). "
            "random:<seed> is for tests: its features barely differ between images and its captions mean "
            "nothing.") from e


def weights_attrs(identity: dict) -> dict:
    """The weights identity as flat HDF5 attrs."""
    out = {"weights": identity["weights"]}
    if "sha256" in identity:
        out.update(weights_sha256=identity["sha256"], weights_path=identity["path"])
    if "stage" in identity:   # made by a stage: hashed once it exists
        out.update(weights_sha256=file_sha256(identity["path"]), weights_path=identity["path"],
                   stage=identity["stage"], pretrained_on=identity["pretrained_on"])
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
    """The InceptionV3 layer a feature layer reads: `mixed7` for both mixed7 and mixed7+<extra>."""
    return layer.partition("+")[0]


def extra_of(layer: str):
    """The FeatureExtra `layer` appends, or None."""
    extra = layer.partition("+")[2]
    return extensions.FEATURE_EXTRAS[extra] if extra else None


def extra_problem(identity: dict, layer: str) -> str | None:
    """Why weights `identity` cannot give `layer`'s extra channels (None when they can, or there are none)."""
    extra = extra_of(layer)
    if extra is None or identity["weights"] == extra.weights:
        return None
    return (f"[encoder] layer = {layer} appends channels that only weights = {extra.weights} provides, and "
            f"[encoder] weights is {identity['weights']!r}. Fix: set weights = {extra.weights}, or layer = "
            f"{base_layer(layer)}.")


def build_encoder(identity: dict, image_size: int, layer: str = DEFAULT_LAYER, precision: str = "float32"):
    """uint8 (B, S, S, 3) → (B, P, D) Keras model (P = grid_size(S, layer)², D = the layer's channels; a
    `+<extra>` layer: the base layer's channels, then the extra's), computing in `precision`
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

    problem, extra = extra_problem(identity, layer), extra_of(layer)
    if problem:
        raise InputError(problem)
    inception = truncated(build_inception(identity, image_size), base_layer(layer))
    images = keras.Input((image_size, image_size, 3), dtype="uint8", name="images")
    x = keras.applications.inception_v3.preprocess_input(keras.ops.cast(images, "float32"))
    grid = inception(x, training=False)
    if extra is not None:
        grid = keras.layers.Concatenate(name="features_and_extras")([grid, extra.build(identity, layer, grid)])
    features = keras.layers.Reshape((-1, layer_spec(layer)["channels"]), name="positions")(grid)
    return keras.Model(images, features, name="encoder")
