"""The Show, Attend and Tell decoder (Xu et al. 2015, soft attention), Keras 3 on TensorFlow.

Shapes: B batch, P positions (64), D encoder channels (2048), F projected feature size, A attention size,
H recurrent units, E word embedding size, V vocabulary, T caption steps.

    x = (features − μ) / σ                  (B, P, D)  per-channel statistics of the training features
                                                       (last k channels: extra channels s, see key_channels)
    a = relu(W_a x + W_p pos)               (B, P, F)  projected once per sequence; pos (P, 16): each cell's
                                                       row and column as sin/cos at 4 frequencies (optional)
    k = U a                                 (B, P, A)  attention keys, also once per sequence
    h0, c0 = tanh(W_h mean(a)), tanh(W_c mean(a))
    step t:  e = v · tanh(k + W h)          (B, P)     Bahdanau attention on the previous state (location = n:
                                                       + W_l conv_n([α_{t-1}, Σ_{t'<t} α_t']), both carried
                                                       after the cell's state, see below; query_word: + W_y E y_{t-1})
             α = softmax(e);  z = β Σ α a   (B, F)     β = sigmoid(w_β h), a gating scalar
             h, c = LSTM([E y_{t-1}; z], (h, c))
    logits = L_o dropout(E y_{t-1} + L_h h + L_z z)    deep output, for all steps at once after the loop

Loss (Xu et al. eq. 14, per caption): Σ_t −log p(y_t) + λ Σ_i (1 − Σ_t α_ti)², both over real steps only;
summed over the batch and divided by the batch's real tokens, so the cross-entropy part is the usual per-token
mean and the doubly stochastic part is on the same per-word footing (see caption_loss).

The position encoding (not in the paper) tells the decoder where each cell is. Convolutional features say little
about absolute position, and a caption that reads objects in order (left to right, say) needs it: with it, the
attention can step from one object to the next (docs/results.md). `positions = True` adds it to the projected
features: the keys (where to look) and the context (what is read) both see it, so the decoder also knows where
it has read (two alike objects otherwise look like one). False: none (the paper).

`key_channels` (k > 0: `[decoder] attention_keys = extras`, features of a `+<extra>` layer) splits each cell's
features: the last k channels (a plug-in's extra channels, e.g. per-cell class scores, local by construction)
make the keys, k = U relu(W_s s + W_p pos), and the other channels the context, a = relu(W_a x). A mixed7 cell
sees far beyond itself, so with keys from the features the attention can read an object from a background cell
beside it; keys from the cell's own scores can only find the object where it is (docs/results.md).
`context_extras` (`[decoder] context_extras = true`) adds the extra channels to the context too,
a = relu(W_a x + W_c s): what the decoder reads at a cell then includes what they say is there.

`query_word` (`[decoder] query_word = true`) lets the attention query read the word the step is given, E y_{t-1},
beside the state h: the state has not yet read that word, and where to look next depends on it (the object just
named is read; look past it). The paper's query is h alone. On captions that read objects in order, it reads
more of them right (docs/results.md).

`location` (`[decoder] location = n`, n > 0) makes the attention location-sensitive (Chorowski et al. 2015; the
cumulative form of Tacotron 2): the previous step's attention and the sum of all earlier ones, laid out on the
side × side grid of cells, go through a convolution of LOCATION_FILTERS n × n filters, and a linear map of the
result joins the attention scores. A cell then scores by where it lies relative to where the attention just was
and has been: the decoder can step from one object to the next instead of staying (one object read twice),
jumping one (a skipped object) or reading a neighbour (docs/results.md). The convolution is computed as one
matrix product, [α, Σ α] (B, 2P) · T (2P, P·LOCATION_FILTERS), T laid out from its kernel once per sequence
(location_matrix): the same numbers as the convolution in 0.8× the time of a training step
(tests/benchmarks/bench_location.py), since a 17×17 kernel over a 17×17 grid is a poor fit for convolution code.
"""
from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from pipeline.vocabulary import Vocabulary
from storage import manifests


LOCATION_FILTERS = 8                # [decoder] location > 0: feature maps of where the attention was


class ShowAttendTell(keras.Model):
    """Call: (features (B, P, D) float, words_in (B, T) int) → (logits (B, T, V), alphas (B, T, P)); words_in
    (B, C, T) gives (B·C, T, V) and (B·C, T, P) (see call)."""

    def __init__(self, vocab_size: int, feature_dim: int = 512, attention_dim: int = 512, embed_dim: int = 256,
                 units: int = 512, dropout: float = 0.5, cell: str = "lstm", feature_channels: int = 2048,
                 positions: bool = False, key_channels: int = 0, context_extras: bool = False,
                 location: int = 0, query_word: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.config = dict(vocab_size=vocab_size, feature_dim=feature_dim, attention_dim=attention_dim,
                           embed_dim=embed_dim, units=units, dropout=dropout, cell=cell,
                           feature_channels=feature_channels, positions=positions, key_channels=key_channels,
                           context_extras=context_extras, location=location, query_word=query_word)
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        if not 0 <= key_channels < feature_channels:
            raise ValueError(f"key_channels must be in [0, {feature_channels}), got {key_channels}")
        if context_extras and not key_channels:
            raise ValueError("context_extras needs key_channels (the extra channels) > 0")
        self.units, self.cell_kind, self.key_channels = units, cell, key_channels
        self.project = keras.layers.Dense(feature_dim, name="project_features")
        self.project_scores = (keras.layers.Dense(feature_dim, name="project_key_channels")
                               if key_channels else None)
        self.context_extras = (keras.layers.Dense(feature_dim, use_bias=False, name="project_scores_context")
                               if context_extras else None)
        self.project_positions = (keras.layers.Dense(feature_dim, use_bias=False, name="project_positions")
                                  if positions else None)
        self.keys = keras.layers.Dense(attention_dim, use_bias=False, name="attention_keys")
        self.location = location
        if location:   # location-sensitive attention: where the attention was, convolved over the grid
            self.location_conv = keras.layers.Conv2D(LOCATION_FILTERS, location, padding="same", use_bias=False,
                                                     name="attention_location_conv")
            self.location_conv.build((None, None, None, 2))   # its kernel is read by location_matrix, not called
            self.location_dense = keras.layers.Dense(attention_dim, use_bias=False, name="attention_location")
        self.query = keras.layers.Dense(attention_dim, name="attention_query")   # of h, or [h; E y] (query_word)
        self.query_word = query_word
        self.score = keras.layers.Dense(1, use_bias=False, name="attention_score")
        self.gate = keras.layers.Dense(1, activation="sigmoid", name="beta_gate")
        self.init_h = keras.layers.Dense(units, activation="tanh", name="init_h")
        self.init_c = keras.layers.Dense(units, activation="tanh", name="init_c")
        self.embed = keras.layers.Embedding(vocab_size, embed_dim, name="embed")
        self.cell = (keras.layers.LSTMCell if cell == "lstm" else keras.layers.GRUCell)(units, name=cell)
        self.out_h = keras.layers.Dense(embed_dim, name="deep_out_h")
        self.out_z = keras.layers.Dense(embed_dim, use_bias=False, name="deep_out_z")
        self.drop = keras.layers.Dropout(dropout)
        self.logits = keras.layers.Dense(vocab_size, name="logits")
        # Per-channel statistics of the training features (set by pipeline/train.py before training, saved
        # with the weights): standardising makes the small image-to-image differences of the features visible.
        self.feature_mean = self.add_weight(shape=(feature_channels,), initializer="zeros", trainable=False,
                                            name="feature_mean")
        self.feature_std = self.add_weight(shape=(feature_channels,), initializer="ones", trainable=False,
                                           name="feature_std")

    def get_config(self):
        return dict(self.config)

    def build(self, *shapes):
        """Sub-layers build themselves on the first call; nothing to create here."""
        self.built = True

    # -- pieces shared by training and decoding (pipeline/decode.py) ------------------------------------

    def encode(self, features):
        """features (B, P, D) → (a (B, P, F), keys (B, P, A), initial state [h, c] or [h])."""
        features = tf.cast((tf.cast(features, tf.float32) - self.feature_mean) / self.feature_std, self.compute_dtype)
        if self.key_channels:   # the last key_channels channels (extras) make the keys, the rest the context
            features, scores = features[..., :-self.key_channels], features[..., -self.key_channels:]
        a = self.project(features)
        if self.context_extras is not None:
            a = a + self.context_extras(scores)
        where = (self.project_positions(tf.cast(position_encoding(tf.shape(features)[1]), self.compute_dtype))
                 if self.project_positions is not None else None)
        if where is not None:
            a = a + where
        key_input = None   # None: the keys are computed from a
        if self.key_channels:
            key_input = self.project_scores(scores) + (where if where is not None else 0)
        a = tf.nn.relu(a)
        keys = self.keys(a if key_input is None else tf.nn.relu(key_input))
        mean = tf.reduce_mean(a, axis=1)
        state = [self.init_h(mean), self.init_c(mean)] if self.cell_kind == "lstm" else [self.init_h(mean)]
        if self.location:               # the previous α and Σ α so far, carried after the cell's state
            state += [tf.zeros(tf.shape(a)[:2], tf.float32), tf.zeros(tf.shape(a)[:2], tf.float32)]
        return a, keys, state

    def location_matrix(self, positions):
        """T (2P, P·LOCATION_FILTERS) for P = `positions` cells (a square grid), or None without `location`:
        [α, Σ α] flattened cell by cell (B, 2P) · T is the "same"-padded convolution of location_conv's kernel
        over the grid, flattened the same way (the gradient reaches the kernel through the gathers). A loop over
        steps computes it once and passes it to every step."""
        if not self.location:
            return None
        kernel = tf.convert_to_tensor(self.location_conv.kernel)                 # (n, n, 2, filters)
        n = self.location
        side = (round(positions ** 0.5) if isinstance(positions, int)     # static: the layout is a constant
                else tf.cast(tf.round(tf.sqrt(tf.cast(positions, tf.float32))), tf.int32))
        # offset o = input − output + side − 1 in [0, 2·side − 2] reads kernel tap o − (side − 1) + (n − 1) // 2
        # ("same" padding), zero outside the kernel: pad (or cut) the kernel to 2·side − 1 taps placed that way
        before = side - 1 - (n - 1) // 2
        after = 2 * side - 1 - n - before
        pad = [tf.maximum(before, 0), tf.maximum(after, 0)]
        kernel = tf.pad(kernel, [pad, pad, [0, 0], [0, 0]])
        start = tf.maximum(-before, 0)
        kernel = kernel[start:start + 2 * side - 1, start:start + 2 * side - 1]
        r = tf.range(side)
        offsets = r[:, None] - r[None, :] + side - 1                              # (input, output)
        t = tf.gather(tf.gather(kernel, offsets, axis=0), offsets, axis=2)     # (in_i, out_i, in_j, out_j, 2, f)
        t = tf.transpose(t, [0, 2, 4, 1, 3, 5])                                  # (in_i, in_j, 2, out_i, out_j, f)
        return tf.cast(tf.reshape(t, [side * side * 2, side * side * LOCATION_FILTERS]), self.compute_dtype)

    def attend(self, a, keys, h, where=None, location_matrix=None, word_embedding=None):
        """One attention read: → (context z (B, F) gated by β, α (B, P)). `where`: [previous α, Σ α] (location),
        read through `location_matrix` (self.location_matrix(P) when not given); `word_embedding` (B, E): the
        step's input word, read by the query with query_word."""
        query = tf.concat([h, tf.cast(word_embedding, h.dtype)], -1) if self.query_word else h
        scores = keys + self.query(query)[:, None, :]
        if where is not None:
            shape = tf.shape(a)
            if location_matrix is None:
                location_matrix = self.location_matrix(shape[1])
            flat = tf.reshape(tf.stack(where, -1), [shape[0], shape[1] * 2])
            found = tf.matmul(tf.cast(flat, location_matrix.dtype), location_matrix)
            scores += self.location_dense(tf.reshape(found, [shape[0], shape[1], LOCATION_FILTERS]))
        e = tf.squeeze(self.score(tf.tanh(scores)), -1)
        alpha = tf.nn.softmax(tf.cast(e, tf.float32), axis=-1)
        # Σ_p α_p a_p as a batched matrix product: its gradient for a (an outer product every step) trains
        # faster than einsum's here (part of bench_location.py's gain)
        z = tf.squeeze(tf.matmul(tf.cast(alpha, a.dtype)[:, None, :], a), 1)
        return self.gate(h) * z, alpha

    def step(self, word_embedding, a, keys, state, training=False, location_matrix=None):
        """One decoder step: → (h (B, H), z (B, F), α (B, P), new state). A loop passes location_matrix(P),
        computed once before it."""
        cells = 2 if self.cell_kind == "lstm" else 1
        cell_state, extra = state[:cells], list(state[cells:])
        where = extra if self.location else None
        z, alpha = self.attend(a, keys, state[0], where, location_matrix, word_embedding)
        h, new_state = self.cell(tf.concat([word_embedding, z], -1), cell_state, training=training)
        new_state = list(new_state) if isinstance(new_state, (list, tuple)) else [new_state]
        if where is not None:
            new_state += [alpha, where[1] + alpha]
        return h, z, alpha, new_state

    def output_logits(self, word_embedding, h, z, training=False):
        """Deep output layer: (..., E), (..., H), (..., F) → logits (..., V)."""
        return self.logits(self.drop(word_embedding + self.out_h(h) + self.out_z(z), training=training))

    # -- teacher-forced pass over whole captions ------------------------------------------------------------

    def call(self, features, words_in, training=False):
        """words_in (B, T), one caption per image; or (B, C, T), C captions per image (training with
        group_captions): each image is encoded once and its projection repeated for its C captions, as
        self-critical.pytorch does (seq_per_img), and the outputs are (B·C, T, …), image by image."""
        a, keys, state = self.encode(features)
        if words_in.shape.rank == 3:
            per_image = tf.shape(words_in)[1]
            a, keys, state = tf.nest.map_structure(lambda x: tf.repeat(x, per_image, axis=0), (a, keys, state))
            words_in = tf.reshape(words_in, [-1, words_in.shape[2] or tf.shape(words_in)[2]])
        # T static when the trace knows it: XLA (jit_compile) needs fixed-size TensorArrays and loop bounds
        steps = words_in.shape[1] if words_in.shape[1] is not None else tf.shape(words_in)[1]
        embedded = self.embed(words_in)                       # (B, T, E), all steps at once
        time_major = tf.transpose(embedded, [1, 0, 2])
        hs = tf.TensorArray(self.compute_dtype, size=steps)
        zs = tf.TensorArray(self.compute_dtype, size=steps)
        alphas = tf.TensorArray(tf.float32, size=steps)
        location = self.location_matrix(a.shape[1] or tf.shape(a)[1])

        def body(t, state, hs, zs, alphas):
            h, z, alpha, state = self.step(time_major[t], a, keys, state, training=training,
                                           location_matrix=location)
            return t + 1, state, hs.write(t, h), zs.write(t, z), alphas.write(t, alpha)

        _, _, hs, zs, alphas = tf.while_loop(lambda t, *_: t < steps, body, (0, state, hs, zs, alphas),
                                             maximum_iterations=steps)
        h_all = tf.transpose(hs.stack(), [1, 0, 2])
        z_all = tf.transpose(zs.stack(), [1, 0, 2])
        logits = self.output_logits(embedded, h_all, z_all, training=training)
        return tf.cast(logits, tf.float32), tf.transpose(alphas.stack(), [1, 0, 2])


def position_encoding(positions):
    """(P, 16) float32 for a square grid of P cells in row-major order (InceptionV3's mixed10 layout): row and
    column scaled to [0, 1], each as sin and cos of π k · coordinate, k = 1..4."""
    side = tf.cast(tf.round(tf.sqrt(tf.cast(positions, tf.float32))), tf.int32)
    index = tf.range(positions)
    coords = tf.cast(tf.stack([index // side, index % side], -1), tf.float32) / tf.cast(tf.maximum(side - 1, 1),
                                                                                        tf.float32)
    angles = 3.141592653589793 * coords[:, :, None] * tf.range(1.0, 5.0)             # (P, 2, 4)
    return tf.reshape(tf.concat([tf.sin(angles), tf.cos(angles)], -1), [positions, 16])


def caption_loss(logits, alphas, words_out, attention_lambda: float = 1.0, tokens=None):
    """(logits (B, T, V), alphas (B, T, P), targets (B, T) with 0 = padding) → (total, cross-entropy, attention).

    The paper's per-caption loss Σ_t NLL + λ Σ_i (1 − Σ_t α_ti)², summed over the batch and divided by its
    number of real tokens: cross-entropy is the mean per real token, and the attention term is the doubly
    stochastic penalty per real token, so total = cross-entropy + λ · attention. (Summing the penalty over
    positions against a per-token mean made it ~97% of the loss; its minimum is uniform attention.)
    `tokens`: the real tokens to divide by instead, e.g. the whole global batch's when this is one replica's
    part of it (pipeline/steps.py)."""
    mask = tf.cast(words_out != 0, tf.float32)                                     # (B, T)
    tokens = tf.maximum(tf.reduce_sum(mask) if tokens is None else tokens, 1.0)
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=words_out, logits=logits)
    xent = tf.reduce_sum(xent * mask) / tokens
    coverage = tf.reduce_sum(alphas * mask[:, :, None], axis=1)                  # (B, P): Σ_t α over real steps
    attention = tf.reduce_sum(tf.square(1.0 - coverage)) / tokens
    return xent + attention_lambda * attention, xent, attention


def load_model(model_dir):
    """(model, vocabulary, features provenance) from a model directory (pipeline/train.py: write_model_dir)."""
    model_dir = Path(model_dir)
    config = manifests.read_json(model_dir / "decoder.json")
    model = ShowAttendTell(**config)
    provenance = manifests.read_json(model_dir / "features.json")
    positions = provenance.get("positions", 64)
    model(tf.zeros((1, positions, config["feature_channels"]), tf.float16), tf.zeros((1, 1), tf.int32))
    model.load_weights(str(model_dir / "decoder.weights.h5"))
    return model, Vocabulary.load(model_dir / "vocab.json"), provenance
