"""Batched caption decoding inside compiled TensorFlow loops (no Python loop per image or per step).

greedy(model, features)  → tokens (B, L) int32, alphas (B, L, P) float32
Tokens after <end> are <pad> (0); <end> itself is kept, so `Vocabulary.decode` stops there.
"""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from pipeline.inputs import feature_batches
from pipeline.model import load_model
from pipeline.progress import Progress

log = logging.getLogger("captioner")


def _cache(model) -> dict:
    """Compiled decoders of `model`, kept on the model (they close over it)."""
    if not hasattr(model, "_captioner_decoders"):
        object.__setattr__(model, "_captioner_decoders", {})   # not a Keras-tracked attribute
    return model._captioner_decoders


def greedy_fn(model, max_length: int, start_id: int, end_id: int, unk_id: int | None = None):
    """A compiled greedy decoder for `model`: features (B, P, D) → (tokens (B, L), alphas (B, L, P)).
    With `unk_id`, <unk> is never chosen."""
    return _word_by_word_fn(model, max_length, start_id, end_id, unk_id, samples=0)


def sampler_fn(model, samples: int, max_length: int, start_id: int, end_id: int, unk_id: int | None = None):
    """A compiled sampler for self-critical training: each word is drawn from the model's distribution
    (tf.random.categorical), `samples` captions per image: features (B, P, D) → (tokens (B·samples, L) image by
    image, alphas). <pad>, <start> and (with `unk_id`) <unk> are never drawn."""
    return _word_by_word_fn(model, max_length, start_id, end_id, unk_id, samples)


def _word_by_word_fn(model, max_length: int, start_id: int, end_id: int, unk_id: int | None, samples: int):
    """greedy_fn (samples = 0) and sampler_fn (samples = n > 0): one compiled loop, a word per step."""
    key = ("greedy", max_length, start_id, end_id, unk_id, samples)
    if key in _cache(model):
        return _cache(model)[key]

    @tf.function(reduce_retracing=True)
    def decode(features):
        a, keys, state = model.encode(features)
        if samples:
            a, keys, state = tf.nest.map_structure(lambda x: tf.repeat(x, samples, axis=0), (a, keys, state))
        batch = tf.shape(a)[0]
        location = model.location_matrix(a.shape[1] or tf.shape(a)[1])
        vocab = model.config["vocab_size"]
        banned = [unk_id] if unk_id is not None else []
        banned += [0, start_id] if samples else []   # <pad> is 0 (pipeline/vocabulary.py)
        ban = tf.reduce_sum(tf.one_hot(tf.constant(banned, tf.int32), vocab, on_value=-1e9, off_value=0.0), axis=0)
        words = tf.fill([batch], start_id)
        done = tf.zeros([batch], tf.bool)
        tokens = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
        alphas = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[None, None])

        def body(t, words, done, state, tokens, alphas):
            emb = model.embed(words)
            h, z, alpha, state = model.step(emb, a, keys, state, location_matrix=location)
            logits = tf.cast(model.output_logits(emb, h, z), tf.float32) + ban
            chosen = (tf.squeeze(tf.random.categorical(logits, 1, dtype=tf.int32), -1) if samples
                      else tf.argmax(logits, axis=-1, output_type=tf.int32))
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

    L = max_length. tokens int32 keep <end> and are 0 (<pad>) after it; alphas float32 are zero after the last
    word; scores float32 are the winners' normalised log-probabilities, log p(words) / length^length_penalty,
    where length counts the words including <end> (length_penalty 0: raw log-probability).

    The search, per image, as in fairseq (K = beam_size):
      * The active beam always holds K unfinished hypotheses of equal length t, so it is pruned by raw
        log-probability. The first step expands only beam 0 (all K start identical: scores 0, -inf, ...).
      * Each step ranks the K·V extensions and takes the top 2K. Those ending in <end> that rank within the top
        K (i.e. would have won a beam place) leave the beam: they are finished, normalised by (t+1)^penalty and
        the best one is kept per image. The best K candidates that do not end form the next active beam, so it
        never shrinks (2K candidates hold at least K that do not end).
      * An image stops searching (its finished set is frozen) as soon as
          (a) K hypotheses have finished (fairseq's rule; this is what makes beam_size 1 exactly greedy
              decoding for any length_penalty), or
          (b) its best finished score can no longer be beaten: log-probabilities are <= 0, so a continuation of
              an active hypothesis with raw score s ends with raw score <= s and length <= L, hence normalised
              score <= s / L^penalty when penalty >= 0; stop when best finished >= max_active s / L^penalty.
              This rule never changes the result, only saves steps (not used for a negative penalty), or
          (c) no active hypothesis has a finite score.
        The compiled loop ends when every image has stopped, or after L steps.
      * Hypotheses still active after L steps (images that did not stop) join the finished set, normalised by
        L^penalty (they have L words and no <end>). The winner is the best normalised finished hypothesis.
    With `unk_id`, <unk> gets log-probability -inf (never chosen; the others are not renormalised).
    All B×K hypotheses advance together in one tf.while_loop.

    Longer than ~50 lines on purpose: the search is one compiled loop whose eleven state tensors are threaded
    through one body; split into functions, the same state would have to be passed through each of them."""
    key = ("beam", beam_size, max_length, start_id, end_id, unk_id, length_penalty)
    if key in _cache(model):
        return _cache(model)[key]
    k = beam_size
    if k < 1 or max_length < 1:
        raise ValueError(f"beam_size and max_length must be >= 1, got {beam_size} and {max_length}")
    vocab = model.config["vocab_size"]
    n_cand = min(2 * k, k * vocab)
    neg_inf = float("-inf")

    def normalise(raw, length):
        return raw / tf.pow(tf.cast(length, tf.float32), float(length_penalty))

    @tf.function(reduce_retracing=True)
    def decode(features):
        batch = tf.shape(features)[0]
        a, keys, state = model.encode(features)
        tile = lambda x: tf.repeat(x, k, axis=0)                       # (B, ...) → (B·K, ...), image-major
        a, keys, state = tile(a), tile(keys), [tile(s) for s in state]
        positions = tf.shape(a)[1]
        location = model.location_matrix(a.shape[1] or positions)
        ban = tf.zeros([vocab]) if unk_id is None else tf.one_hot(unk_id, vocab, on_value=neg_inf, off_value=0.0)
        image_rows = tf.range(batch)[:, None] * k                       # (B, 1): first row of each image

        # active beam: K unfinished hypotheses per image, with t words each (fixed-size buffers, zeros after t)
        scores = tf.tile(tf.concat([[0.0], tf.fill([k - 1], neg_inf)], 0)[None], [batch, 1])   # (B, K)
        words = tf.fill([batch * k], start_id)                          # (B·K,) previous word
        tokens = tf.zeros([batch, k, max_length], tf.int32)
        alphas = tf.zeros([batch, k, max_length, positions], tf.float32)
        # finished set per image: its best member, and how many finished so far
        best_score = tf.fill([batch], neg_inf)                         # normalised
        best_tokens = tf.zeros([batch, max_length], tf.int32)
        best_alphas = tf.zeros([batch, max_length, positions], tf.float32)
        finished = tf.zeros([batch], tf.int32)
        stopped = tf.zeros([batch], tf.bool)

        def body(t, words, scores, state, tokens, alphas, best_score, best_tokens, best_alphas, finished, stopped):
            emb = model.embed(words)
            h, z, alpha, state = model.step(emb, a, keys, state, location_matrix=location)
            logp = tf.nn.log_softmax(tf.cast(model.output_logits(emb, h, z), tf.float32)) + ban
            candidates = tf.reshape(scores[:, :, None] + tf.reshape(logp, [batch, k, vocab]), [batch, k * vocab])
            cand_scores, flat = tf.math.top_k(candidates, k=n_cand)       # (B, 2K), best first
            origin, word = flat // vocab, flat % vocab
            alpha = tf.reshape(alpha, [batch, k, positions])
            at_t = tf.one_hot(t, max_length)                              # writes step t into the buffers

            # -- hypotheses ending here: <end> within the top K; keep the best per image if it improves --
            in_top_k = tf.range(n_cand) < k
            ends = (tf.equal(word, end_id) & in_top_k[None] & tf.logical_not(stopped)[:, None]
                    & (cand_scores > neg_inf))
            ended = tf.where(ends, normalise(cand_scores, t + 1), neg_inf)
            which = tf.argmax(ended, axis=1, output_type=tf.int32)       # (B,)
            new_score = tf.gather(ended, which, batch_dims=1)
            source = tf.gather(origin, which, batch_dims=1)              # its beam of origin
            new_tokens = tf.gather(tokens, source, batch_dims=1) + end_id * tf.cast(at_t, tf.int32)[None]
            new_alphas = (tf.gather(alphas, source, batch_dims=1)
                          + tf.gather(alpha, source, batch_dims=1)[:, None, :] * at_t[None, :, None])
            better = new_score > best_score
            best_score = tf.where(better, new_score, best_score)
            best_tokens = tf.where(better[:, None], new_tokens, best_tokens)
            best_alphas = tf.where(better[:, None, None], new_alphas, best_alphas)
            finished += tf.reduce_sum(tf.cast(ends, tf.int32), axis=1)

            # -- next active beam: the K best candidates that do not end (same length: raw scores compare) --
            scores, keep = tf.math.top_k(tf.where(tf.equal(word, end_id), neg_inf, cand_scores), k=k)
            origin, word = tf.gather(origin, keep, batch_dims=1), tf.gather(word, keep, batch_dims=1)   # (B, K)
            state = [tf.gather(s, tf.reshape(origin + image_rows, [-1])) for s in state]
            tokens = tf.gather(tokens, origin, batch_dims=1) + word[:, :, None] * tf.cast(at_t, tf.int32)
            alphas = (tf.gather(alphas, origin, batch_dims=1)
                      + tf.gather(alpha, origin, batch_dims=1)[:, :, None, :] * at_t[:, None])

            # -- which images stop searching (see the docstring) --
            best_active = tf.reduce_max(scores, axis=1)
            stopped |= (finished >= k) | tf.equal(best_active, neg_inf)
            if length_penalty >= 0:
                stopped |= best_score >= normalise(best_active, max_length)
            return (t + 1, tf.reshape(word, [-1]), scores, state, tokens, alphas, best_score, best_tokens,
                    best_alphas, finished, stopped)

        def cond(t, *args):
            return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(args[-1])))

        loop = (tf.constant(0), words, scores, state, tokens, alphas, best_score, best_tokens, best_alphas,
                finished, stopped)
        # every loop variable keeps its shape, but gathers forget a static batch size: declare it variable
        shapes = tf.nest.map_structure(lambda x: tf.TensorShape([None, *x.shape[1:]]) if x.shape.rank else x.shape,
                                       loop)
        _, _, scores, _, tokens, alphas, best_score, best_tokens, best_alphas, _, stopped = tf.while_loop(
            cond, body, loop, shape_invariants=shapes)
        # images still searching ran all L steps: their active hypotheses (L words, no <end>) join the finished set
        which = tf.argmax(scores, axis=1, output_type=tf.int32)
        unfinished = normalise(tf.gather(scores, which, batch_dims=1), max_length)
        better = tf.logical_not(stopped) & (unfinished > best_score)
        return (tf.where(better[:, None], tf.gather(tokens, which, batch_dims=1), best_tokens),
                tf.where(better[:, None, None], tf.gather(alphas, which, batch_dims=1), best_alphas),
                tf.where(better, unfinished, best_score))

    _cache(model)[key] = decode
    return decode


def decoder_fn(model, vocab, beam_size: int = 3, max_length: int = 20, length_penalty: float = 1.0,
               suppress_unk: bool = True):
    """The compiled decoder for the [generation] settings: greedy_fn when beam_size is 1, else beam_fn.
    Both return tokens (B, L) and alphas (B, L, P) first."""
    unk = vocab.index["<unk>"] if suppress_unk else None
    start, end = vocab.index["<start>"], vocab.index["<end>"]
    if beam_size == 1:
        return greedy_fn(model, max_length, start, end, unk)
    return beam_fn(model, beam_size, max_length, start, end, unk, length_penalty)


def generate(model_dir, by_shard: dict, beam_size: int = 3, max_length: int = 20,
             length_penalty: float = 1.0, suppress_unk: bool = True, batch_size: int = 64, progress_callback=None):
    """Caption every image of a split from its feature shards with the model in `model_dir`.

    by_shard: pipeline.inputs.shard_rows of the split index. The decoding is caption_rows' (so `captioner
    caption`, CaptionImages and the export, which use the same search, give the same caption and score).
    Returns (results [{"image_id", "caption", "score"}], image_ids, tokens (n, L), attention (n, L, P) float16)."""
    ids, tokens, attention, scores, captions = caption_rows(model_dir, by_shard, beam_size, max_length,
                                                            length_penalty, suppress_unk, batch_size,
                                                            progress_callback)
    results = [{"image_id": int(i), "caption": c, "score": round(float(s), 5)}
               for i, c, s in zip(ids.tolist(), captions, scores.tolist())]
    return results, ids, tokens, attention


def caption_rows(model_dir, by_shard: dict, beam_size: int = 3, max_length: int = 20, length_penalty: float = 1.0,
                 suppress_unk: bool = True, batch_size: int = 64, progress_callback=None):
    """Like generate, with each caption's score (beam_fn's normalised log-probability; beam 1 is exactly
    greedy): → (image_ids, tokens, attention float16, scores, captions), sorted by image id."""
    model, vocab, _ = load_model(model_dir)
    unk = vocab.index["<unk>"] if suppress_unk else None
    decode = beam_fn(model, beam_size, max_length, vocab.index["<start>"], vocab.index["<end>"], unk, length_penalty)
    return decode_rows(decode, vocab, by_shard, batch_size, max_length, progress_callback)


def decode_rows(decode, vocab, by_shard: dict, batch_size: int, max_length: int, progress_callback=None):
    """Run a compiled decoder over feature rows (pipeline.inputs.shard_rows) in batches:
    → (image_ids, tokens (n, L), attention (n, L, P) float16, scores (n,) or None, captions), sorted by id."""
    progress = Progress(sum(len(rows) for rows in by_shard.values()), "captioning", "images", progress_callback)
    ids, tokens, attention, scores = [], [], [], []
    for batch_ids, feats in feature_batches(by_shard, batch_size, 256):
        out = decode(feats)
        ids.append(batch_ids)
        tokens.append(out[0].numpy())
        attention.append(out[1].numpy().astype(np.float16))
        if len(out) > 2:
            scores.append(out[2].numpy())
        progress.update(len(batch_ids))
    if not ids:
        return (np.zeros(0, np.int64), np.zeros((0, max_length), np.int32),
                np.zeros((0, max_length, 0), np.float16), np.zeros(0, np.float32), [])
    order = np.argsort(np.concatenate(ids), kind="stable")
    ids, tokens = np.concatenate(ids)[order], np.concatenate(tokens)[order]
    cut = int(np.sum(~np.any(tokens == vocab.index["<end>"], axis=1)))
    if cut:
        log.warning("%d of %d captions reached [generation] max_length = %d (<end> included) unfinished: they are cut "
                    "short. A model that repeats itself needs more training; captions as long as the training ones "
                    "(at most %d words, [vocabulary] max_length) need [generation] max_length = %d", cut, len(ids),
                    max_length, vocab.max_length, vocab.max_length + 1)
    return (ids, tokens, np.concatenate(attention)[order], np.concatenate(scores)[order] if scores else None,
            [vocab.decode(row) for row in tokens])
