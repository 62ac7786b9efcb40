"""Batched caption decoding inside compiled TensorFlow loops (no Python loop per image or per step).

greedy(model, features)  → tokens (B, L) int32, alphas (B, L, P) float32
Tokens after <end> are <pad> (0); <end> itself is kept, so `Vocabulary.decode` stops there.
"""
from __future__ import annotations

import tensorflow as tf

def _cache(model) -> dict:
    """Compiled decoders of `model`, kept on the model (they close over it)."""
    if not hasattr(model, "_captioner_decoders"):
        object.__setattr__(model, "_captioner_decoders", {})   # not a Keras-tracked attribute
    return model._captioner_decoders


def greedy_fn(model, max_length: int, start_id: int, end_id: int, unk_id: int | None = None):
    """A compiled greedy decoder for `model`: features (B, P, D) → (tokens (B, L), alphas (B, L, P)).
    With `unk_id`, <unk> is never chosen."""
    key = ("greedy", max_length, start_id, end_id, unk_id)
    if key in _cache(model):
        return _cache(model)[key]

    @tf.function(reduce_retracing=True)
    def decode(features):
        a, keys, state = model.encode(features)
        batch = tf.shape(features)[0]
        vocab = model.config["vocab_size"]
        ban = (tf.one_hot(unk_id, vocab, on_value=-1e9, off_value=0.0) if unk_id is not None
               else tf.zeros([vocab]))
        words = tf.fill([batch], start_id)
        done = tf.zeros([batch], tf.bool)
        tokens = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
        alphas = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[None, None])

        def body(t, words, done, state, tokens, alphas):
            emb = model.embed(words)
            h, z, alpha, state = model.step(emb, a, keys, state)
            logits = tf.cast(model.output_logits(emb, h, z), tf.float32) + ban
            chosen = tf.argmax(logits, axis=-1, output_type=tf.int32)
            chosen = tf.where(done, tf.zeros_like(chosen), chosen)
            return (t + 1, chosen, done | tf.equal(chosen, end_id), state, tokens.write(t, chosen),
                    alphas.write(t, alpha))

        def cond(t, words, done, *_):
            return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(done)))

        t, _, _, _, tokens, alphas = tf.while_loop(cond, body, (0, words, done, state, tokens, alphas))
        tokens = tf.transpose(tokens.stack(), [1, 0])
        alphas = tf.transpose(alphas.stack(), [1, 0, 2])
        pad = max_length - t       # the loop may stop early: pad to a fixed width
        return (tf.pad(tokens, [[0, 0], [0, pad]]), tf.pad(alphas, [[0, 0], [0, pad], [0, 0]]))

    _cache(model)[key] = decode
    return decode


def beam_fn(model, beam_size: int, max_length: int, start_id: int, end_id: int, unk_id: int | None = None,
            length_penalty: float = 1.0):
    """A compiled batched beam search: features (B, P, D) → (tokens (B, L), alphas (B, L, P), scores (B,)).

    All B×K hypotheses advance together in one tf.while_loop. A finished hypothesis only extends with
    <pad> at no cost, so it keeps its score; the loop stops when every hypothesis has finished or at
    max_length. The winner maximises log-probability / length^length_penalty (length counts <end>);
    beam_size 1 is exactly greedy decoding."""
    key = ("beam", beam_size, max_length, start_id, end_id, unk_id, length_penalty)
    if key in _cache(model):
        return _cache(model)[key]
    k = beam_size

    @tf.function(reduce_retracing=True)
    def decode(features):
        batch = tf.shape(features)[0]
        vocab = model.config["vocab_size"]
        a, keys, state = model.encode(features)
        tile = lambda x: tf.repeat(x, k, axis=0)                       # (B, ...) → (B·K, ...)
        a, keys, state = tile(a), tile(keys), [tile(s) for s in state]
        ban = tf.zeros([vocab]) if unk_id is None else tf.one_hot(unk_id, vocab, on_value=-1e9, off_value=0.0)
        # a finished hypothesis may only continue with <pad>, at log-probability 0
        after_end = tf.one_hot(0, vocab, on_value=0.0, off_value=-1e9)
        scores = tf.tile(tf.concat([[0.0], tf.fill([k - 1], -1e9)], 0)[None], [batch, 1])   # (B, K): beam 0 alive
        words = tf.fill([batch * k], start_id)
        done = tf.zeros([batch, k], tf.bool)
        lengths = tf.zeros([batch, k], tf.float32)
        tokens = tf.zeros([batch, k, 0], tf.int32)
        alphas = tf.zeros([batch, k, 0, tf.shape(a)[1]], tf.float32)

        def body(t, words, done, lengths, scores, state, tokens, alphas):
            emb = model.embed(words)
            h, z, alpha, state = model.step(emb, a, keys, state)
            logp = tf.nn.log_softmax(tf.cast(model.output_logits(emb, h, z), tf.float32)) + ban
            logp = tf.reshape(logp, [batch, k, vocab])
            logp = tf.where(done[:, :, None], after_end[None, None], logp)
            candidates = tf.reshape(scores[:, :, None] + logp, [batch, k * vocab])
            scores, flat = tf.math.top_k(candidates, k=k)                  # (B, K)
            origin, word = flat // vocab, flat % vocab
            pick = lambda x: tf.gather(x, origin, batch_dims=1)            # reorder (B, K, ...) by origin beam
            rows = tf.reshape(origin + tf.range(batch)[:, None] * k, [-1])  # same, on (B·K, ...) tensors
            state = [tf.gather(s, rows) for s in state]
            was_done = pick(done)
            lengths = pick(lengths) + tf.cast(tf.logical_not(was_done), tf.float32)
            done = was_done | tf.equal(word, end_id)
            tokens = tf.concat([pick(tokens), word[:, :, None]], 2)
            step_alpha = tf.reshape(tf.gather(alpha, rows), [batch, k, 1, -1])
            alphas = tf.concat([pick(alphas), step_alpha], 2)
            return t + 1, tf.reshape(word, [-1]), done, lengths, scores, state, tokens, alphas

        def cond(t, words, done, *_):
            return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(done)))

        shapes = (tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([None, k]), tf.TensorShape([None, k]),
                  tf.TensorShape([None, k]), [tf.TensorShape([None, s.shape[-1]]) for s in state],
                  tf.TensorShape([None, k, None]), tf.TensorShape([None, k, None, None]))
        t, _, done, lengths, scores, _, tokens, alphas = tf.while_loop(
            cond, body, (0, words, done, lengths, scores, state, tokens, alphas), shape_invariants=shapes)
        normalised = scores / tf.pow(tf.maximum(lengths, 1.0), length_penalty)
        best = tf.argmax(normalised, axis=1, output_type=tf.int32)
        tokens = tf.gather(tokens, best, batch_dims=1)
        alphas = tf.gather(alphas, best, batch_dims=1)
        pad = max_length - t
        return (tf.pad(tokens, [[0, 0], [0, pad]]), tf.pad(alphas, [[0, 0], [0, pad], [0, 0]]),
                tf.gather(normalised, best, batch_dims=1))

    _cache(model)[key] = decode
    return decode


def generate(model_dir, by_shard: dict, beam_size: int = 3, max_length: int = 20,
             length_penalty: float = 1.0, suppress_unk: bool = True, batch_size: int = 64, progress_callback=None):
    """Caption every image of a split from its feature shards with the model in `model_dir`.

    by_shard: pipeline.train.shard_rows of the split index.
    Returns (results [{"image_id", "caption"}], image_ids, tokens (n, L), attention (n, L, P) float16)."""
    import numpy as np
    from pipeline.progress import Progress
    from pipeline.train import feature_batches, load_model

    model, vocab, _ = load_model(model_dir)
    unk = vocab.index["<unk>"] if suppress_unk else None
    start, end = vocab.index["<start>"], vocab.index["<end>"]
    decode = (greedy_fn(model, max_length, start, end, unk) if beam_size == 1
              else beam_fn(model, beam_size, max_length, start, end, unk, length_penalty))
    progress = Progress(sum(len(rows) for rows in by_shard.values()), "captioning", "images", progress_callback)
    results, ids, tokens, attention = [], [], [], []
    for batch_ids, feats in feature_batches(by_shard, batch_size, 256):
        out = decode(feats)
        for image_id, row in zip(batch_ids.tolist(), out[0].numpy()):
            results.append({"image_id": int(image_id), "caption": vocab.decode(row)})
        ids.append(batch_ids)
        tokens.append(out[0].numpy())
        attention.append(out[1].numpy().astype(np.float16))
        progress.update(len(batch_ids))
    order = np.argsort(np.concatenate(ids)) if ids else np.zeros(0, int)
    results = sorted(results, key=lambda r: r["image_id"])
    stack = lambda parts, empty: np.concatenate(parts)[order] if parts else empty
    return (results, stack(ids, np.zeros(0, np.int64)), stack(tokens, np.zeros((0, max_length), np.int32)),
            stack(attention, np.zeros((0, max_length, 0), np.float16)))
