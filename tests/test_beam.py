"""Beam search (pipeline.decode.beam_fn) against brute force, a plain-Python reference, and greedy decoding."""
import math

import numpy as np
import pytest
import tensorflow as tf

from pipeline.decode import beam_fn, greedy_fn
from pipeline.model import ShowAttendTell

PAD, START, END = 0, 1, 2
POSITIONS = 5


class TableModel:
    """A stand-in for ShowAttendTell whose next-word distribution is a fixed table per image:
    p(w_t | image, w_{t-2}, w_{t-1}) = tables[image, w_{t-2}, w_{t-1}, w_t] (before <start> there is <pad>).

    Image n's features must be `features_for(n)`. The image index and w_{t-2} travel in the recurrent state,
    so the beam search must reorder the state correctly. α_t = one-hot of w_{t-1} mod POSITIONS."""

    def __init__(self, tables):
        tables = np.asarray(tables, np.float64)
        if tables.ndim == 3:                                   # bigram tables (N, V, V): ignore w_{t-2}
            tables = np.repeat(tables[:, None], tables.shape[1], axis=1)
        self.tables = tables / tables.sum(-1, keepdims=True)
        with np.errstate(divide="ignore"):
            self.log_tables = np.log(self.tables)              # -inf for impossible words
        self.config = {"vocab_size": tables.shape[-1]}
        self._table = tf.constant(self.log_tables, tf.float32)

    @staticmethod
    def features_for(images):
        return tf.constant(np.broadcast_to(np.asarray(images, np.float32)[:, None, None], (len(images), POSITIONS, 3)))

    def encode(self, features):
        image = features[:, 0, :1]                              # (B, 1)
        return features, features, [image, tf.fill(tf.shape(image), float(PAD))]

    def embed(self, words):
        return words

    def location_matrix(self, positions):
        return None                                             # no location-sensitive attention

    def step(self, emb, a, keys, state, location_matrix=None):
        h = tf.concat(state, -1)                                # (B, 2): image, w_{t-2}
        alpha = tf.one_hot(emb % POSITIONS, POSITIONS)
        return h, tf.zeros_like(h), alpha, [state[0], tf.cast(emb, tf.float32)[:, None]]

    def output_logits(self, emb, h, z):
        index = tf.stack([tf.cast(h[:, 0], tf.int32), tf.cast(h[:, 1], tf.int32), emb], -1)
        return tf.gather_nd(self._table, index)

    # -- plain-Python views of the same model ----------------------------------------------------------

    def logp(self, image, words):
        """log p(next word | words so far), (V,)."""
        context = [PAD, START, *words]
        return self.log_tables[image, context[-2], context[-1]]

    def brute_force(self, image, max_length, penalty):
        """The exact best caption: (normalised score, words), over every caption of at most max_length words."""
        best = (-math.inf, None)

        def visit(words, score):
            nonlocal best
            for w, lp in enumerate(self.logp(image, words)):
                if lp == -math.inf:
                    continue
                if w == END or len(words) + 1 == max_length:
                    normalised = (score + lp) / (len(words) + 1) ** penalty
                    best = max(best, (normalised, words + [w]), key=lambda b: b[0])
                if w != END and len(words) + 1 < max_length:
                    visit(words + [w], score + lp)

        visit([], 0.0)
        return best

    def reference_beam(self, image, k, max_length, penalty, shrinking=False):
        """Beam search written plainly: (normalised score, words).

        shrinking=False: the algorithm beam_fn documents, without its early stop (b), which must not matter.
        shrinking=True: the old behaviour, where finished hypotheses keep their beam places (extending at no
        cost) and the search ends when all K have finished."""
        beam, finished = [(0.0, [])], []
        for t in range(max_length):
            candidates = []
            for score, words in beam:
                if shrinking and words and words[-1] == END:
                    candidates.append((score, words))
                    continue
                lp = self.logp(image, words)
                candidates += [(score + lp[w], words + [w]) for w in range(len(lp)) if lp[w] > -math.inf]
            candidates.sort(key=lambda c: -c[0])                 # stable: ties keep beam-then-word order
            if shrinking:
                beam = candidates[:k]
                if all(words[-1] == END for _, words in beam):
                    break
                continue
            candidates = candidates[:2 * k]
            finished += [(s / (t + 1) ** penalty, w) for s, w in candidates[:k] if w[-1] == END]
            beam = [c for c in candidates if c[1][-1] != END][:k]
            if len(finished) >= k or not beam:
                break
        else:
            finished += [(s / max_length ** penalty, w) for s, w in beam]
        if shrinking:
            finished = [(s / len(w) ** penalty, w) for s, w in beam]
        return max(finished, key=lambda f: f[0])


def words_of(row):
    """The caption of a tokens row, up to and including <end>."""
    row = list(row)
    return row[:row.index(END) + 1] if END in row else row


def check_layout(model, tokens, alphas):
    """<pad> after <end>, α zero after the last word, and α_t = one-hot of the previous word (TableModel)."""
    for row, alpha in zip(tokens, alphas):
        words = words_of(row)
        assert all(w == PAD for w in row[len(words):])
        assert not alpha[len(words):].any()
        previous = [START, *words[:-1]]
        np.testing.assert_array_equal(alpha[:len(words)], np.eye(POSITIONS)[np.array(previous) % POSITIONS])


# Word ids of the hand-built tables (shared vocabulary of 12).
X, Y, Y1, Y2, E1, E2, E3, R, S, A, B, C = range(3, 15)
V = 15


def short_or_long():
    """A short caption finishes first with the best raw probability; a longer one wins after normalisation.
    X <end>: 0.36 (raw -1.02, /2 = -0.51);  Y B <end>: 0.34 (raw -1.08, /3 = -0.36);  X A <end>: 0.24."""
    t = np.zeros((V, V))
    t[START, X], t[START, Y] = 0.6, 0.4
    t[X, END], t[X, A] = 0.6, 0.4
    t[A, END] = 1.0
    t[Y, B] = 1.0
    t[B, END], t[B, A] = 0.85, 0.15
    t[PAD, PAD] = t[END, PAD] = 1.0                             # rows never used
    for w in (Y1, Y2, E1, E2, E3, R, S, C):
        t[w, END] = 1.0
    return t


def finished_blocks_the_beam():
    """With K = 2: after two steps X <end> (0.495) ranks first, Y Y1 (0.225) second and Y Y2 (0.18) third.
    Y Y2 leads to the best normalised caption Y Y2 E1 E2 E3 <end> (-1.715 / 6 = -0.286 > X <end> -0.352),
    Y Y1 only to a decaying R/S cycle that never ends. If X <end> keeps its beam place, Y Y2 is pruned."""
    t = np.zeros((V, V))
    t[START, X], t[START, Y] = 0.55, 0.45
    t[X, END], t[X, R] = 0.9, 0.1
    t[Y, Y1], t[Y, Y2], t[Y, END] = 0.5, 0.4, 0.1
    t[Y1, R] = t[Y1, S] = t[R, R] = t[R, S] = t[S, R] = t[S, S] = 0.5
    t[Y2, E1] = t[E1, E2] = t[E2, E3] = t[E3, END] = 1.0
    t[PAD, PAD] = t[END, PAD] = 1.0
    for w in (A, B, C):
        t[w, END] = 1.0
    return t


def never_ends():
    """<end> has probability 0 everywhere: the best caption is X X X ... (0.7 · 0.6^(L-1))."""
    t = np.zeros((V, V))
    t[START, X], t[START, Y] = 0.7, 0.3
    t[X, X], t[X, Y] = 0.6, 0.4
    t[Y, X], t[Y, Y] = 0.5, 0.5
    t[PAD, PAD] = t[END, PAD] = 1.0
    for w in (Y1, Y2, E1, E2, E3, R, S, A, B, C):
        t[w, X] = 1.0
    return t


@pytest.fixture(scope="module")
def hand_built():
    return TableModel([short_or_long(), finished_blocks_the_beam(), never_ends()])


def test_hand_built_cases_have_the_intended_answers(hand_built):
    """The premises of the next test: brute force and the old shrinking beam, in plain Python."""
    m = hand_built
    assert m.brute_force(0, 8, 1.0)[1] == [Y, B, END]          # longer wins after normalisation ...
    assert m.brute_force(0, 8, 0.0)[1] == [X, END]             # ... the short one on raw log-probability
    assert m.brute_force(1, 8, 1.0)[1] == [Y, Y2, E1, E2, E3, END]
    assert m.reference_beam(1, 2, 8, 1.0, shrinking=True)[1] == [X, END]   # the old beam loses it
    assert m.brute_force(2, 8, 1.0)[1] == [X] * 8


@pytest.mark.parametrize("penalty", [1.0, 0.0])
def test_beam_finds_the_brute_force_best_caption(hand_built, penalty):
    m = hand_built
    tokens, alphas, scores = beam_fn(m, 2, 8, START, END, length_penalty=penalty)(m.features_for([0, 1, 2]))
    tokens, alphas, scores = tokens.numpy(), alphas.numpy(), scores.numpy()
    assert tokens.shape == (3, 8) and tokens.dtype == np.int32 and alphas.shape == (3, 8, POSITIONS)
    assert scores.dtype == np.float32
    for image in range(3):
        best_score, best_words = m.brute_force(image, 8, penalty)
        assert words_of(tokens[image]) == best_words, image
        assert scores[image] == pytest.approx(best_score, abs=1e-5)
    check_layout(m, tokens, alphas)


@pytest.mark.parametrize("penalty", [1.0, 0.5, 0.0])
def test_captions_unfinished_at_max_length(hand_built, penalty):
    """A model that never emits <end>: max_length words, no <end>, score normalised by max_length."""
    m = hand_built
    tokens, alphas, scores = beam_fn(m, 3, 6, START, END, length_penalty=penalty)(m.features_for([2, 2]))
    assert tokens.numpy().tolist() == [[X] * 6] * 2
    np.testing.assert_allclose(scores.numpy(), np.log(0.7 * 0.6 ** 5) / 6 ** penalty, rtol=1e-5)
    check_layout(m, tokens.numpy(), alphas.numpy())


def test_beam_equals_the_plain_reference_on_random_models():
    """Random second-order models, 8 images in one batch: tokens and scores equal the plain-Python reference
    (which has no early stop, so the stopping rule changes nothing), for several beam sizes and penalties."""
    rng = np.random.default_rng(0)
    n, v = 8, 9
    tables = rng.dirichlet(np.full(v, 0.3), size=(n, v, v))
    tables[..., END] *= rng.uniform(0.5, 3.0, size=(n, 1, 1))  # images differ in how soon they end
    tables[..., PAD] = 0.0                                      # keep <pad> out of captions
    m = TableModel(tables)
    features = m.features_for(range(n))
    for k in (1, 2, 3, 5):
        for penalty in (1.0, 0.0):
            tokens, alphas, scores = beam_fn(m, k, 7, START, END, length_penalty=penalty)(features)
            tokens = tokens.numpy()
            for image in range(n):
                expected_score, expected_words = m.reference_beam(image, k, 7, penalty)
                assert words_of(tokens[image]) == expected_words, (k, penalty, image)
                assert scores.numpy()[image] == pytest.approx(expected_score, abs=1e-5), (k, penalty, image)
            check_layout(m, tokens, alphas.numpy())
            if k == 1:
                greedy, _ = greedy_fn(m, 7, START, END)(features)
                np.testing.assert_array_equal(tokens, greedy.numpy())


def test_unk_is_never_chosen(hand_built):
    """In image 0, banning X leaves Y B <end> for any penalty."""
    m = hand_built
    tokens, _, scores = beam_fn(m, 2, 8, START, END, unk_id=X, length_penalty=0.0)(m.features_for([0]))
    assert words_of(tokens.numpy()[0]) == [Y, B, END]
    assert scores.numpy()[0] == pytest.approx(np.log(0.34), abs=1e-5)


@pytest.fixture(scope="module", params=[0, 5], ids=["attention", "location-sensitive attention"])
def real_model(request):
    """A ShowAttendTell with random weights, scaled up so that images differ, and <end> made likelier so that
    greedy captions end after 1 or 2 words or not at all, and beam 3 differs from greedy on some images; with
    plain attention, and with [decoder] location (two more state tensors the beam must carry). The seeds are
    ones whose random model has those properties."""
    tf.keras.utils.set_random_seed(21 if request.param else 11)
    model = ShowAttendTell(vocab_size=20, feature_dim=16, attention_dim=16, embed_dim=8, units=16, dropout=0.0,
                           feature_channels=32, location=request.param)
    features = tf.random.stateless_normal((6, 64, 32), seed=(3, 4))
    model(features, tf.zeros((6, 1), tf.int32))
    for layer in (model.logits, model.out_h, model.out_z, model.project):
        layer.kernel.assign(layer.kernel * 3.0)
    bias = model.logits.bias.numpy()
    bias[END] += 1.0
    model.logits.bias.assign(bias)
    return model, features


@pytest.mark.parametrize("penalty", [1.0, 0.0])
def test_beam_one_is_greedy_on_a_real_model(real_model, penalty):
    model, features = real_model
    greedy_tokens, greedy_alphas = greedy_fn(model, 10, START, END, unk_id=3)(features)
    tokens, alphas, scores = beam_fn(model, 1, 10, START, END, unk_id=3, length_penalty=penalty)(features)
    np.testing.assert_array_equal(tokens.numpy(), greedy_tokens.numpy())
    lengths = [len(words_of(row)) for row in tokens.numpy()]
    for i, n in enumerate(lengths):          # greedy_fn leaves attention after <end>; beam_fn zero-pads it
        np.testing.assert_allclose(alphas.numpy()[i, :n], greedy_alphas.numpy()[i, :n], atol=1e-6)
        assert not alphas.numpy()[i, n:].any()
    assert 10 in lengths and max(n for n in lengths if n < 10) > 1  # unfinished and finished captions
    # the score is the caption's normalised log-probability under a teacher-forced pass
    words_in = np.concatenate([np.full((6, 1), START), tokens.numpy()[:, :-1]], 1)
    logits, _ = model(features, tf.constant(words_in))
    logp = tf.nn.log_softmax(logits).numpy()
    for i, n in enumerate(lengths):
        expected = logp[i, np.arange(n), tokens.numpy()[i, :n]].sum() / n ** penalty
        assert scores.numpy()[i] == pytest.approx(expected, abs=1e-4)


def test_images_decode_independently_of_their_batch(real_model):
    model, features = real_model
    decode = beam_fn(model, 3, 10, START, END, unk_id=3)
    tokens, alphas, scores = decode(features)
    greedy, _ = greedy_fn(model, 10, START, END, unk_id=3)(features)
    assert (tokens.numpy() != greedy.numpy()).any()             # the beam matters here
    for i in range(features.shape[0]):
        one = decode(features[i:i + 1])
        np.testing.assert_array_equal(one[0].numpy()[0], tokens.numpy()[i])
        np.testing.assert_allclose(one[1].numpy()[0], alphas.numpy()[i], atol=1e-5)
        assert one[2].numpy()[0] == pytest.approx(scores.numpy()[i], abs=1e-5)
