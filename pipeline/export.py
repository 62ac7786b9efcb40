"""`captioner export MODEL_DIR OUT_DIR`: a trained captioner as one TensorFlow SavedModel, for TF Serving,
`saved_model_cli run` or `tf.saved_model.load`, with no project code installed (docs/serving.md).

It holds InceptionV3 with exactly the weights recorded in the model's provenance (and, for a `+<extra>`
layer, its extra channels), the decoder, the vocabulary and the beam search
(pipeline/decode.py: beam_fn) with the model's [generation] settings. Signature `serving_default`:

    images      tf.string  [batch]          encoded image bytes: JPEG, PNG, GIF (first frame), BMP, WebP
    → captions  tf.string  [batch]          the words, space-separated, without <start> and <end>
      scores    tf.float32 [batch]          normalised log-probability of each caption (beam_fn)
      attention tf.float32 [batch, T, P]    the weights over the P cells when each word was chosen; T is the
                                            maximum length, rows after the caption's <end> are zero

P is the encoder layer's grid (64 for mixed10, 289 for mixed7 at 299 px). A request with an image TensorFlow
cannot decode fails as a whole. Written with Keras' ExportArchive, each variable is saved once, as the plain
tf.Variable the graph reads (the collection `variables` lists them), so both loaders restore every one: the
eager `tf.saved_model.load` and the graph-mode one of TF Serving and `saved_model_cli run`
(`tf.compat.v1.saved_model.loader.load`). A Keras 3 model saved from a tf.Module loads only in the former: its
Keras variables are saved as copies the graph never reads, and the graph-mode loader fails on the first variable the
signature reads ("Could not find variable ...").

Preprocessing computes the pipeline's pixels (pipeline/images.py: load_image) exactly, in TensorFlow ops:
  JPEG  libjpeg's accurate integer IDCT, at 1/2, 1/4 or 1/8 scale while both sides stay >= S (what Pillow's
        draft mode picks), then turned upright by the EXIF orientation (Exif segment, IFD0);
  PNG   16-bit by the high byte; alpha or tRNS transparency composited onto white with Pillow's integer formula;
  then stretched to S×S by Pillow's bilinear resampling: its float64 weights rounded to 22-bit fixed point,
  two passes each rounded to uint8, in the order the installed Pillow uses (PASS_ORDERS); then InceptionV3's
  own scaling. Features are rounded to float16 as the shards store them, and decoded by the model's beam search.
Not reproduced: transparency in GIFs (not painted white), CMYK JPEGs (colours differ by 1 in some pixels), an
orientation recorded only in XMP or in a non-JPEG file's EXIF; TIFF and other formats Pillow reads and
TensorFlow does not are refused. tests/test_export.py checks the captions equal the pipeline's in a fresh
process with each loader; tests/benchmarks/export_agreement.py counts them on a split.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from storage.workspace import atomic_dir

PRECISION_BITS = 22          # Pillow's 8-bit resampling keeps its coefficients in 32 − 8 − 2 fraction bits
JPEG_SCALES = (1, 2, 4, 8)   # libjpeg's reduced-size decoding, as Pillow's JpegImageFile.draft chooses it
# The order of Pillow's two resampling passes to S×S (each rounds to uint8, so the order shows in the pixels):
# Pillow 11.0 to 12.1 resample horizontally first; 12.2 and 12.3 vertically first for images over 100 times taller
# than wide (h > 100·w, h > S); 13 vertically first when the height shrinks by more than twice what the width
# shrinks by (h − S > 2·max(w − S, 0)). pass_order() finds the installed Pillow's by probing it.
PASS_ORDERS = ("horizontal first", "vertical first for images over 100 times taller than wide",
               "vertical first when the height shrinks more than twice the width")


def export(model_dir, out_dir, identity: dict, beam_size: int, max_length: int, length_penalty: float,
           suppress_unk: bool) -> dict:
    """Write the SavedModel to `out_dir` (atomically) and return what it holds (also written to
    `out_dir`/assets.extra/captioner.json)."""
    import keras
    import PIL
    import tensorflow as tf

    from pipeline import decode, encoder as encoder_lib
    from pipeline.model import load_model

    model, vocab, provenance = load_model(model_dir)
    size, layer = provenance["encoder"]["image_size"], encoder_lib.layer_of(provenance["encoder"]["encoder"])
    precision = provenance["encoder"].get("precision", "float32")   # the features the decoder was trained on
    encoder = encoder_lib.build_encoder(identity, size, layer, precision)
    search = decode.beam_fn(model, beam_size, max_length, vocab.index["<start>"], vocab.index["<end>"],
                            vocab.index["<unk>"] if suppress_unk else None, length_penalty)
    order = pass_order()
    if order is None:
        warnings.warn(f"Pillow {PIL.__version__} resamples in an order this export does not reproduce: served "
                      "captions can differ from the pipeline's. The export resamples horizontally first.")
    archive = keras.export.ExportArchive()
    endpoint = archive.add_endpoint("serving_default", serving_fn(encoder, search, vocab, size, order),
                                    input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    state = tracked_variables([encoder, model], endpoint.get_concrete_function())
    archive.add_variable_collection("variables", state)
    about = {"model": str(model_dir), "encoder": {k: v for k, v in identity.items() if k != "path"},
             "image_size": size, "layer": layer, "precision": precision, "positions": provenance.get("positions", 64),
             "decoding": {"beam_size": beam_size, "max_length": max_length, "length_penalty": length_penalty,
                          "suppress_unk": suppress_unk},
             "preprocessing": {"pillow": PIL.__version__, "resampling": order or "unknown: " + PASS_ORDERS[0],
                               "jpeg": "accurate integer IDCT, reduced-size decoding as Pillow's draft, EXIF "
                                       "orientation"},
             "variables": len(state), "parameters": int(sum(v.shape.num_elements() for v in state)),
             "signature": {"inputs": {"images": "tf.string [batch], encoded JPEG/PNG bytes"},
                           "outputs": {"captions": "tf.string [batch]", "scores": "tf.float32 [batch]",
                                       "attention": "tf.float32 [batch, T, positions]"}}}
    with atomic_dir(out_dir) as tmp:
        archive.write_out(str(tmp), verbose=False)
        (Path(tmp) / "assets.extra").mkdir(exist_ok=True)
        (Path(tmp) / "assets.extra" / "captioner.json").write_text(json.dumps(about, indent=1))
    return about


def serving_fn(encoder, search, vocab, size: int, order: str | None):
    """The signature's body: images (encoded bytes) → {captions, scores, attention}, through `encoder` and the
    compiled beam search `search`."""
    import tensorflow as tf

    words = tf.constant(vocab.tokens)
    skip = tf.constant([vocab.index[t] for t in ("<pad>", "<start>")])
    end = vocab.index["<end>"]

    def serve(images):
        batch = tf.map_fn(lambda encoded: pixels(encoded, size, order or PASS_ORDERS[0]), images,
                          fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
        features = tf.cast(encoder(batch, training=False), tf.float16)
        tokens, attention, scores = search(features)
        ended = tf.cumsum(tf.cast(tf.equal(tokens, end), tf.int32), axis=1) > 0
        keep = tf.logical_not(ended) & tf.reduce_all(tokens[..., None] != skip, axis=-1)
        captions = tf.strings.reduce_join(tf.ragged.boolean_mask(tf.gather(words, tokens), keep), axis=1,
                                          separator=" ")
        return {"captions": captions, "scores": scores, "attention": attention}

    return serve


def tracked_variables(models, concrete) -> list:
    """The tf.Variables to save: those of every Keras model in `models` (the encoder's batch-norm statistics and
    heads included) and every variable the signature's graph `concrete` reads, each once. A Keras variable is
    represented by the tf.Variable it wraps, which is what the graph reads; saving the Keras variable itself
    would add a second copy that the graph-mode loader restores instead (see the module docstring)."""
    import tensorflow as tf

    found = {}
    for v in [x for m in models for x in m.variables] + list(concrete.variables):
        inner = v if isinstance(v, tf.Variable) else v.value
        if not isinstance(inner, tf.Variable):
            raise TypeError(f"{getattr(v, 'path', v)}: expected a TensorFlow variable, found {type(inner).__name__}")
        found.setdefault(id(inner), inner)
    return list(found.values())


def pixels(encoded, size: int, order: str):
    """Encoded image bytes → uint8 (size, size, 3), as pipeline.images.load_image computes them with a Pillow
    that resamples in `order` (one of PASS_ORDERS)."""
    import tensorflow as tf

    def jpeg():
        return orient(_decode_jpeg(encoded, size), exif_orientation(encoded))

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: _decode_other(encoded))
    return tf.ensure_shape(resize(image, size, order), [size, size, 3])


def resize(image, size: int, order: str):
    """uint8 (H, W, C) → (size, size, C) with Pillow's bilinear filter: two passes, each rounded to uint8, in
    `order` (PASS_ORDERS)."""
    import tensorflow as tf

    def horizontal(x):
        return _resample(x, 1, *_coefficients(tf.shape(x)[1], size))

    def vertical(x):
        return _resample(x, 0, *_coefficients(tf.shape(x)[0], size))

    if order == PASS_ORDERS[0]:
        return vertical(horizontal(image))
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    if order == PASS_ORDERS[1]:
        first = (height > 100 * width) & (height > size)
    else:
        first = height - size > 2 * tf.maximum(width - size, 0)
    return tf.cond(first, lambda: horizontal(vertical(image)), lambda: vertical(horizontal(image)))


def pass_order() -> str | None:
    """Which of PASS_ORDERS the installed Pillow follows, found by resizing probe images with it as
    pipeline/images.py does (None: neither)."""
    import numpy as np
    from PIL import Image

    rng, size = np.random.default_rng(0), 7
    probes = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for w, h in ((8, 16), (16, 8), (5, 9), (9, 5), (8, 9), (8, 10), (20, 20), (2, 300), (3, 301))]
    for order in PASS_ORDERS:
        if all(np.array_equal(np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR)),
                              resize(p, size, order).numpy()) for p in probes):
            return order
    return None


def exif_orientation(encoded, window: int = 1 << 17):
    """The EXIF orientation (1–8) of JPEG bytes, 1 when there is none: IFD0's tag 0x0112 in the first Exif APP1
    segment among the first `window` bytes, which is where Pillow's getexif() finds it. Reads past the data
    read zeros (orientation 1), so damaged headers never fail."""
    import tensorflow as tf

    head = tf.concat([tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 0, window), tf.uint8), tf.int32),
                      tf.zeros([16], tf.int32)], 0)
    n = tf.size(head) - 16

    def byte(i):
        return tf.gather(head, tf.clip_by_value(i, 0, n + 15))

    def segment(pos, found):   # JPEG markers as Pillow walks them: junk and 0xFF padding skipped byte by byte
        marker, length = byte(pos + 1), byte(pos + 2) * 256 + byte(pos + 3)
        exif = tf.reduce_all(tf.stack([byte(pos + 4 + i) for i in range(6)]) == tf.constant(list(b"Exif\0\0")))
        hit = (byte(pos) == 0xFF) & tf.equal(marker, 0xE1) & exif
        bare = (marker == 0xC8) | ((marker >= 0xD0) & (marker <= 0xD9)) | ((marker >= 0xF0) & (marker <= 0xFD))
        step = tf.where((byte(pos) != 0xFF) | (marker == 0xFF) | (marker == 0), 1, tf.where(bare, 2, 2 + length))
        return pos + step, tf.where(hit, pos + 10, found)

    def more(pos, found):
        return (found < 0) & (pos + 4 <= n) & tf.logical_not((byte(pos) == 0xFF) & tf.equal(byte(pos + 1), 0xDA))

    _, tiff = tf.while_loop(more, segment, (2, -1))
    little = tf.equal(byte(tiff), ord("I"))

    def number(at, size):      # unsigned integers of `size` bytes at `at` in the TIFF's byte order
        values = [byte(at + i) for i in range(size)]
        return tf.where(little, sum(v * 256 ** i for i, v in enumerate(values)),
                        sum(v * 256 ** (size - 1 - i) for i, v in enumerate(values)))

    ifd = tiff + number(tiff + 4, 4)
    entries = ifd + 2 + 12 * tf.range(tf.minimum(number(ifd, 2), 1024))
    values = tf.where(tf.equal(number(entries + 2, 2), 4), number(entries + 8, 4), number(entries + 8, 2))
    value = tf.concat([[1], tf.boolean_mask(values, tf.equal(number(entries, 2), 0x0112))], 0)[-1]   # the last
    return tf.where(tiff >= 0, value, 1)


def orient(image, orientation):
    """`image` turned upright for an EXIF orientation, as Pillow's ImageOps.exif_transpose does it."""
    import tensorflow as tf

    turns = [lambda: image,
             lambda: image,                                          # 1: upright
             lambda: image[:, ::-1],                                 # 2: FLIP_LEFT_RIGHT
             lambda: image[::-1, ::-1],                              # 3: ROTATE_180
             lambda: image[::-1],                                    # 4: FLIP_TOP_BOTTOM
             lambda: tf.transpose(image, [1, 0, 2]),                 # 5: TRANSPOSE
             lambda: tf.transpose(image, [1, 0, 2])[:, ::-1],        # 6: ROTATE_270
             lambda: tf.transpose(image, [1, 0, 2])[::-1, ::-1],     # 7: TRANSVERSE
             lambda: tf.transpose(image, [1, 0, 2])[::-1]]           # 8: ROTATE_90
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation, 0)
    return tf.ensure_shape(tf.switch_case(index, turns), [None, None, 3])


def _decode_jpeg(encoded, size: int):
    """RGB at the reduced scale Pillow's draft(None, (size, size)) picks: the largest of 1/2, 1/4, 1/8 that
    keeps both sides >= size (libjpeg's scaled IDCT in both)."""
    import tensorflow as tf

    height, width = tf.unstack(tf.image.extract_jpeg_shape(encoded)[:2])
    reduce = tf.minimum(width // size, height // size)
    branch = tf.reduce_sum(tf.cast(reduce >= tf.constant(JPEG_SCALES[1:]), tf.int32))
    decoders = [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
                for r in JPEG_SCALES]
    return tf.ensure_shape(tf.switch_case(branch, decoders), [None, None, 3])


def _decode_other(encoded):
    """PNG, GIF, BMP, WebP → RGB; transparency (PNG alpha, tRNS) composited onto white as Pillow's
    Image.alpha_composite does it (pipeline/images.py: _to_rgb)."""
    import tensorflow as tf

    def png():
        rgba = tf.cast(tf.io.decode_png(encoded, channels=4), tf.int32)
        alpha = rgba[..., 3:]
        coef1 = alpha * 128                       # Pillow: src.a·255·255·2^7 / outa255, outa255 = 255·255
        mixed = rgba[..., :3] * coef1 + 255 * (255 * 128 - coef1) + (0x80 << 7)
        mixed = (mixed // 256 + mixed) // 256 // 128   # SHIFTFORDIV255, then the 7 precision bits
        return tf.cast(tf.where(alpha == 0, 255, mixed), tf.uint8)

    def other():
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    is_png = tf.equal(tf.strings.substr(encoded, 0, 8), b"\x89PNG\r\n\x1a\n")
    return tf.ensure_shape(tf.cond(is_png, png, other), [None, None, 3])


def _coefficients(in_size, out_size: int):
    """Pillow's bilinear resampling weights from `in_size` to `out_size` pixels (libImaging/Resample.c:
    precompute_coeffs, normalize_coeffs_8bpc), in the same float64 operations: → (first input pixel (out,),
    fixed-point weights (out, K) int32, zero past each window)."""
    import tensorflow as tf

    scale = tf.cast(in_size, tf.float64) / out_size
    filterscale = tf.maximum(scale, 1.0)                        # antialiased when downscaling
    support = filterscale                                       # the triangle filter's support is 1
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    first = tf.maximum(tf.cast(tf.floor(center - support + 0.5), tf.int32), 0)
    count = tf.minimum(tf.cast(tf.floor(center + support + 0.5), tf.int32), in_size) - first
    x = tf.range(ksize)
    t = (tf.cast(first[:, None] + x, tf.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    w = tf.where(x < count[:, None], tf.maximum(1.0 - tf.abs(t), 0.0), 0.0)
    total = tf.foldl(lambda a, column: a + column, tf.transpose(w),    # summed left to right, as in C
                     initializer=tf.zeros([out_size], tf.float64))
    w = tf.where(total[:, None] != 0.0, w / total[:, None], w)
    return first, tf.cast(tf.floor(0.5 + w * (1 << PRECISION_BITS)), tf.int32)


def _resample(image, axis: int, first, weights):
    """One pass of Pillow's 8-bit resampling of uint8 (H, W, C) along `axis` (1: horizontal, 0: vertical):
    Σ pixel·weight in int32 from 2^21, shifted right by 22 bits and clipped to 0..255."""
    import tensorflow as tf

    image = tf.cast(image, tf.int32)
    last = tf.shape(image)[axis] - 1
    shape = [1, -1, 1] if axis == 1 else [-1, 1, 1]

    def body(j, total):
        near = tf.gather(image, tf.minimum(first + j, last), axis=axis)
        return j + 1, total + near * tf.reshape(weights[:, j], shape)

    start = tf.zeros_like(tf.gather(image, first, axis=axis)) + (1 << (PRECISION_BITS - 1))
    _, total = tf.while_loop(lambda j, _: j < tf.shape(weights)[1], body, (0, start))
    return tf.cast(tf.clip_by_value(total // (1 << PRECISION_BITS), 0, 255), tf.uint8)
