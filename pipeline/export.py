"""`captioner export MODEL_DIR OUT_DIR`: a trained captioner as one TensorFlow SavedModel, for TF Serving or
`tf.saved_model.load` with no project code installed.

It holds InceptionV3 with exactly the weights recorded in the model's provenance, the decoder, the vocabulary
and the beam search (pipeline/decode.py: beam_fn) with the model's [generation] settings. Signature
`serving_default`:

    images     tf.string [batch]              encoded image bytes (JPEG, PNG, GIF's first frame, BMP)
    → captions tf.string [batch]
      scores   tf.float32 [batch]             normalised log-probability of each caption
      attention tf.float32 [batch, T, P]      the weights over the P cells when each word was chosen

Preprocessing matches the pipeline's (pipeline/images.py) as closely as TensorFlow allows: decode to RGB,
stretch to S×S with antialiased bilinear resizing (Pillow's bilinear filter is antialiased when downscaling),
round to uint8, then InceptionV3's own scaling; features are rounded to float16 as the shards store them.
Differences: TensorFlow neither applies EXIF orientation nor uses libjpeg's reduced-size (draft) decoding of
large JPEGs, and its resampling kernel differs slightly from Pillow's. README states the measured agreement.
"""
from __future__ import annotations

import json
from pathlib import Path

from storage.workspace import atomic_dir


def export(model_dir, out_dir, identity: dict, beam_size: int, max_length: int, length_penalty: float,
           suppress_unk: bool) -> dict:
    """Write the SavedModel to `out_dir` (atomically) and return what it holds (also written to
    `out_dir`/assets.extra/captioner.json)."""
    import tensorflow as tf

    from pipeline import decode, encoder as encoder_lib
    from pipeline.model import load_model

    model, vocab, provenance = load_model(model_dir)
    size, layer = provenance["encoder"]["image_size"], encoder_lib.layer_of(provenance["encoder"]["encoder"])
    encoder = encoder_lib.build_encoder(identity, size, layer)
    unk = vocab.index["<unk>"] if suppress_unk else None
    search = decode.beam_fn(model, beam_size, max_length, vocab.index["<start>"], vocab.index["<end>"], unk,
                            length_penalty)
    words = tf.constant(vocab.tokens)
    skip = tf.constant([vocab.index[t] for t in ("<pad>", "<start>")])
    end = vocab.index["<end>"]

    def pixels(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    class Captioner(tf.Module):
        def __init__(self):
            super().__init__(name="captioner")
            self.encoder, self.decoder = encoder, model

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve(self, images):
            batch = tf.map_fn(pixels, images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
            features = tf.cast(self.encoder(batch, training=False), tf.float16)
            tokens, attention, scores = search(features)
            ended = tf.cumsum(tf.cast(tf.equal(tokens, end), tf.int32), axis=1) > 0
            keep = tf.logical_not(ended) & tf.reduce_all(tokens[..., None] != skip, axis=-1)
            captions = tf.strings.reduce_join(tf.ragged.boolean_mask(tf.gather(words, tokens), keep), axis=1,
                                              separator=" ")
            return {"captions": captions, "scores": scores, "attention": attention}

    module = Captioner()
    about = {"model": str(model_dir), "encoder": {k: v for k, v in identity.items() if k != "path"},
             "image_size": size, "layer": layer, "positions": provenance.get("positions", 64),
             "decoding": {"beam_size": beam_size, "max_length": max_length, "length_penalty": length_penalty,
                          "suppress_unk": suppress_unk},
             "signature": {"inputs": {"images": "tf.string [batch], encoded JPEG/PNG bytes"},
                           "outputs": {"captions": "tf.string [batch]", "scores": "tf.float32 [batch]",
                                       "attention": "tf.float32 [batch, T, positions]"}}}
    with atomic_dir(out_dir) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve})
        (Path(tmp) / "assets.extra").mkdir(exist_ok=True)
        (Path(tmp) / "assets.extra" / "captioner.json").write_text(json.dumps(about, indent=1))
    return about
