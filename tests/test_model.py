"""The decoder: masking, attention, the doubly stochastic term, memorising a few captions, GRU."""
import numpy as np
import pytest
import tensorflow as tf

from pipeline import steps, train as train_lib
from pipeline.decode import greedy_fn
from pipeline.model import ShowAttendTell, caption_loss

P, D, V = 16, 32, 12


def small_model(cell="lstm", dropout=0.0, positions=False, key_channels=0, context_extras=False,
                location=0, query_word=False):
    model = ShowAttendTell(V, feature_dim=24, attention_dim=16, embed_dim=12, units=20, dropout=dropout, cell=cell,
                           feature_channels=D, positions=positions, key_channels=key_channels,
                           context_extras=context_extras, location=location, query_word=query_word)
    model(tf.zeros((1, P, D)), tf.zeros((1, 1), tf.int32))
    return model


def loss_of(model, features, captions):
    logits, alphas = model(features, captions[:, :-1])
    return caption_loss(logits, alphas, captions[:, 1:])


def test_padding_changes_nothing():
    model = small_model()
    features = tf.random.stateless_normal((2, P, D), seed=(1, 2))
    short = tf.constant([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    long = tf.pad(short, [[0, 0], [0, 7]])
    for a, b in zip(loss_of(model, features, short), loss_of(model, features, long)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_attention_weights_sum_to_one_per_step():
    model = small_model()
    _, alphas = model(tf.random.stateless_normal((3, P, D), seed=(3, 4)), tf.constant([[1, 4, 5, 6]] * 3))
    assert alphas.shape == (3, 4, P)
    np.testing.assert_allclose(tf.reduce_sum(alphas, -1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("positions", [False, True])
def test_only_the_position_encoding_tells_where_a_cell_is(positions):
    # the same cells in another order: without positions the decoder is blind to the order (its attention
    # follows the cells, its words do not change); with them it sees a different image
    model = small_model(positions=positions)
    features = tf.random.stateless_normal((1, P, D), seed=(7, 8))
    order = np.random.default_rng(0).permutation(P)
    words = tf.constant([[1, 4, 5, 6]])
    logits, alphas = model(features, words)
    logits_moved, alphas_moved = model(tf.gather(features, order, axis=1), words)
    same = np.allclose(logits.numpy(), logits_moved.numpy(), atol=1e-5)
    assert same != bool(positions)
    if not positions:
        np.testing.assert_allclose(tf.gather(alphas, order, axis=2).numpy(), alphas_moved.numpy(), atol=1e-6)


@pytest.mark.parametrize("positions", [False, True])
def test_positions_place_both_the_keys_and_what_the_context_reads(positions):
    # moved cells: without positions what the context reads (a) and the keys (where to look) move with them;
    # with positions both also say where each cell is
    model = small_model(positions=positions)
    features = tf.random.stateless_normal((1, P, D), seed=(5, 6))
    order = np.random.default_rng(1).permutation(P)
    a, keys, _ = model.encode(features)
    a_moved, keys_moved, _ = model.encode(tf.gather(features, order, axis=1))
    assert np.allclose(tf.gather(a, order, axis=1).numpy(), a_moved.numpy(), atol=1e-6) != positions
    assert np.allclose(tf.gather(keys, order, axis=1).numpy(), keys_moved.numpy(), atol=1e-5) != positions


def content_and_scores_changed(k):
    """Features (2, P, D) whose last k channels are cell scores; the same with other content, and with other
    scores."""
    features = tf.random.stateless_normal((2, P, D), seed=(9, 10))
    other_content = tf.concat([tf.random.stateless_normal((2, P, D - k), seed=(11, 12)), features[..., -k:]], -1)
    other_scores = tf.concat([features[..., :-k], tf.random.stateless_normal((2, P, k), seed=(13, 14))], -1)
    return features, other_content, other_scores


@pytest.mark.parametrize("positions", [False, True])
def test_key_channels_make_the_keys_and_the_other_channels_the_context(positions):
    # attention_keys = extras: the last K channels (the cell scores) decide where to look, and only that;
    # the others are what is read, and only that
    K = 5
    model = small_model(positions=positions, key_channels=K)
    features, other_content, other_scores = content_and_scores_changed(K)
    a, keys, _ = model.encode(features)
    a_content, keys_content, _ = model.encode(other_content)
    a_scores, keys_scores, _ = model.encode(other_scores)
    np.testing.assert_allclose(keys.numpy(), keys_content.numpy(), atol=1e-6)
    np.testing.assert_allclose(a.numpy(), a_scores.numpy(), atol=1e-6)
    assert not np.allclose(a.numpy(), a_content.numpy(), atol=1e-3)
    assert not np.allclose(keys.numpy(), keys_scores.numpy(), atol=1e-3)
    # with positions the keys still tell the cells apart when their scores are all alike
    same_scores = tf.concat([features[..., :-K], tf.ones((2, P, K))], -1)
    _, keys_alike, _ = model.encode(same_scores)
    assert np.allclose(keys_alike[:, :1].numpy(), keys_alike.numpy(), atol=1e-6) == (not positions)


def test_context_extras_let_the_context_read_the_cell_scores_too():
    # [decoder] context_extras = true: the keys are still the scores' alone, and the context reads both
    K = 5
    model = small_model(positions=True, key_channels=K, context_extras=True)
    features, other_content, other_scores = content_and_scores_changed(K)
    a, keys, _ = model.encode(features)
    a_content, keys_content, _ = model.encode(other_content)
    a_scores, _, _ = model.encode(other_scores)
    np.testing.assert_allclose(keys.numpy(), keys_content.numpy(), atol=1e-6)
    assert not np.allclose(a.numpy(), a_content.numpy(), atol=1e-3)
    assert not np.allclose(a.numpy(), a_scores.numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="context_extras needs key_channels"):
        small_model(context_extras=True)


def test_location_carries_the_last_attention_and_its_sum_and_they_steer_the_next():
    # [decoder] location = k: the state ends with the previous α and Σ α, convolved over the 4×4 grid of cells
    model = small_model(location=3)
    features = tf.random.stateless_normal((2, P, D), seed=(17, 18))
    a, keys, state = model.encode(features)
    assert len(state) == 2 + 2 and not any(np.any(s.numpy()) for s in state[2:])
    embedding = model.embed(tf.constant([1, 1]))
    _, _, alpha1, state = model.step(embedding, a, keys, state)
    _, _, alpha2, state = model.step(embedding, a, keys, state)
    np.testing.assert_allclose(state[-2].numpy(), alpha2.numpy(), rtol=1e-6)
    np.testing.assert_allclose(state[-1].numpy(), (alpha1 + alpha2).numpy(), rtol=1e-6)
    # the same cell state with the attention elsewhere before: another attention now
    moved = tf.roll(state[-2], 5, axis=1)
    _, _, here, _ = model.step(embedding, a, keys, state)
    _, _, there, _ = model.step(embedding, a, keys, state[:-2] + [moved, state[-1]])
    assert not np.allclose(here.numpy(), there.numpy(), atol=1e-6)
    logits, alphas = model(features, tf.constant([[1, 4, 5, 6]] * 2))   # trains like any other state
    assert logits.shape == (2, 4, V) and np.isfinite(logits.numpy()).all()
    np.testing.assert_allclose(tf.reduce_sum(alphas, -1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("query_word", [False, True])
def test_query_word_lets_the_input_word_steer_the_attention(query_word):
    # [decoder] query_word = true: the same state given another word looks elsewhere; without it the word only
    # reaches the attention at the next step, through the state
    model = small_model(query_word=query_word)
    a, keys, state = model.encode(tf.random.stateless_normal((2, P, D), seed=(21, 22)))
    _, _, alpha, _ = model.step(model.embed(tf.constant([4, 4])), a, keys, state)
    _, _, other, _ = model.step(model.embed(tf.constant([5, 5])), a, keys, state)
    assert np.allclose(alpha.numpy(), other.numpy(), atol=1e-7) != query_word
    assert model.get_layer("attention_query").kernel.shape[0] == 20 + 12 * query_word   # units (+ embed_dim)


@pytest.mark.parametrize("width, side, static", [(3, 4, True), (4, 4, True), (17, 17, True), (9, 3, True),
                                                 (2, 5, True), (17, 17, False), (4, 5, False)])
def test_the_location_matrix_is_the_location_convolution(width, side, static):
    # [α, Σ α] · T must be the "same"-padded convolution of the location kernel, for odd and even kernel widths,
    # for kernels wider than the grid (the demo's 17 on a 17×17 grid), and for a grid size known only when the
    # graph runs (a tensor); the gradient must reach the kernel
    model = ShowAttendTell(V, feature_dim=8, attention_dim=8, embed_dim=8, units=8, feature_channels=D,
                           location=width)
    where = tf.random.stateless_uniform((3, side, side, 2), seed=(width, side))
    with tf.GradientTape() as tape:
        matrix = model.location_matrix(side * side if static else tf.constant(side * side))
        flat = tf.reshape(tf.reshape(where, [3, -1]) @ matrix, [3, side, side, -1])
        total = tf.reduce_sum(flat * where[..., :1])
    convolved = model.location_conv(where)
    np.testing.assert_allclose(flat.numpy(), convolved.numpy(), rtol=1e-5, atol=1e-6)
    gradient = tape.gradient(total, model.location_conv.kernel)
    assert gradient is not None and np.any(gradient.numpy())


def test_key_channels_must_leave_channels_to_read():
    with pytest.raises(ValueError, match="key_channels"):
        small_model(key_channels=D)


def test_position_encoding_is_distinct_per_cell():
    from pipeline.model import position_encoding
    codes = position_encoding(64).numpy()
    assert codes.shape == (64, 16)
    assert len({tuple(np.round(row, 5)) for row in codes}) == 64


def test_doubly_stochastic_term_zero_iff_every_position_sums_to_one():
    logits = tf.zeros((1, P, V))
    targets = tf.ones((1, P), tf.int32)                      # P real steps
    one_each = tf.eye(P)[None]                                # step t attends to position t only: Σ_t α = 1
    _, _, doubly = caption_loss(logits, one_each, targets)
    assert float(doubly) == 0.0
    uniform = tf.fill((1, P, P), 1.0 / P)                     # also sums to 1 everywhere
    assert float(caption_loss(logits, uniform, targets)[2]) == pytest.approx(0.0, abs=1e-10)
    half = tf.fill((1, P // 2, P), 1.0 / P)                   # too few steps: Σ_t α = 0.5
    short = caption_loss(tf.zeros((1, P // 2, V)), half, tf.ones((1, P // 2), tf.int32))
    assert float(short[2]) == pytest.approx(P * 0.25 / (P // 2))   # the paper's Σ_i, per real token
    padded = tf.concat([tf.eye(P)[None], tf.fill((1, 3, P), 1.0 / P)], 1)   # padded steps do not count
    targets = tf.concat([tf.ones((1, P), tf.int32), tf.zeros((1, 3), tf.int32)], 1)
    assert float(caption_loss(tf.zeros((1, P + 3, V)), padded, targets)[2]) == 0.0


def test_loss_is_the_papers_per_caption_sum_divided_by_the_batch_tokens():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(2, 5, V)), tf.float32)
    alphas = tf.nn.softmax(tf.constant(rng.normal(size=(2, 5, P)), tf.float32))
    targets = tf.constant([[4, 5, 6, 2, 0], [7, 2, 0, 0, 0]])            # 4 + 2 real tokens
    total, xent, attention = caption_loss(logits, alphas, targets, attention_lambda=0.3)
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits).numpy()
    paper = 0.0   # Xu et al. eq. 14 for each caption: Σ_t NLL + λ Σ_i (1 − Σ_t α_ti)², real steps only
    for b, n in ((0, 4), (1, 2)):
        coverage = alphas.numpy()[b, :n].sum(0)
        paper += nll[b, :n].sum() + 0.3 * ((1 - coverage) ** 2).sum()
    assert float(total) == pytest.approx(paper / 6, rel=1e-5)
    assert float(total) == pytest.approx(float(xent) + 0.3 * float(attention), rel=1e-6)
    assert float(xent) == pytest.approx((nll[0, :4].sum() + nll[1, :2].sum()) / 6, rel=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_memorises_a_few_captions_and_greedy_returns_them(cell):
    tf.keras.utils.set_random_seed(0)
    model = small_model(cell)
    features = tf.random.stateless_normal((4, P, D), seed=(5, 6))
    captions = tf.constant([[1, 4, 5, 6, 2, 0], [1, 7, 8, 2, 0, 0], [1, 9, 10, 11, 4, 2], [1, 5, 4, 2, 0, 0]])
    settings = {**train_lib.DEFAULTS, "learning_rate": 0.01, "lr_schedule": "constant", "clip_norm": 5.0, "epochs": 1}
    optimizer = steps.make_optimizer(settings, steps_per_epoch=1)
    step = steps.make_train_step(model, optimizer, tf.distribute.get_strategy(), settings)
    for _ in range(300):
        loss, xent, _, _ = step(features, captions)
    assert float(xent) < 0.05
    tokens, alphas = greedy_fn(model, 8, start_id=1, end_id=2)(features)
    want = np.zeros((4, 8), np.int32)
    want[:, :5] = captions.numpy()[:, 1:]
    np.testing.assert_array_equal(tokens.numpy(), want)        # exact, <end> included, <pad> after
    np.testing.assert_allclose(tf.reduce_sum(alphas[:, :3], -1).numpy(), 1.0, rtol=1e-5)


def test_the_xla_train_step_matches_the_plain_one():
    """[training] jit_compile = true: XLA compiles the step (one program per caption length) and trains the same
    model: same losses step after step, batches of two caption lengths alternating."""
    features = tf.random.stateless_normal((2, P, D), seed=(7, 8))
    batches = [tf.constant([[1, 4, 5, 2], [1, 7, 2, 0]]), tf.constant([[1, 4, 5, 6, 7, 2], [1, 9, 2, 0, 0, 0]])]
    losses = {}
    for jit in (False, True):
        tf.keras.utils.set_random_seed(0)
        model = small_model()
        settings = {**train_lib.DEFAULTS, "jit_compile": jit}
        optimizer = steps.make_optimizer(settings, steps_per_epoch=1)
        step = steps.make_train_step(model, optimizer, tf.distribute.get_strategy(), settings)
        losses[jit] = [float(step(features, batch)[0]) for batch in batches * 3]
    assert losses[False][0] != losses[False][2]   # it trains
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_grouped_captions_train_as_the_same_pairs():
    """Grouped batches (self-critical training's): a step on (images, their captions (B, C, T)) computes what a
    step on the pairs (each image's features repeated per caption) does — one projection per image instead of per caption — and
    counts only real captions (an all-padding row fills a missing one)."""
    features = tf.random.stateless_normal((2, P, D), seed=(3, 4))
    grouped = tf.constant([[[1, 4, 5, 2], [1, 7, 2, 0]], [[1, 9, 9, 2], [0, 0, 0, 0]]])
    results = {}
    for name, (feats, caps) in {"grouped": (features, grouped),
                                "pairs": (tf.repeat(features, 2, axis=0), tf.reshape(grouped, (4, 4)))}.items():
        tf.keras.utils.set_random_seed(0)
        model = small_model()
        optimizer = steps.make_optimizer(train_lib.DEFAULTS, steps_per_epoch=1)
        step = steps.make_train_step(model, optimizer, tf.distribute.get_strategy(), train_lib.DEFAULTS)
        results[name] = [[float(x) for x in step(feats, caps)] for _ in range(3)]
    assert results["grouped"][0][0] != results["grouped"][2][0]   # it trains
    assert [r[3] for r in results["grouped"]] == [3, 3, 3]        # captions counted: the padding row is not one
    np.testing.assert_allclose(results["grouped"], results["pairs"], rtol=1e-5)
