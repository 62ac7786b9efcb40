"""Self-critical training's parts: the CIDEr-D reward, the digit reward, the baseline, the sampler and the step."""
import numpy as np
import pytest
import tensorflow as tf

from pipeline import steps, train as train_lib
from pipeline.decode import sampler_fn
from pipeline.digits.metrics import DigitReward, edit_distance
from pipeline.rewards import CiderD
from tests.test_model import P, D, V, small_model

WORDS = "a an image of digits digit two three seven reading written in dark ink on light paper".split()


def random_captions(rng, n):
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def test_cider_d_equals_pycocoevalcap_on_the_corpus_it_was_built_from():
    from pycocoevalcap.cider.cider import Cider
    rng = np.random.default_rng(0)
    references = {i: random_captions(rng, 5) for i in range(40)}
    hypotheses = {i: random_captions(rng, 1) for i in references}
    hypotheses[3] = [references[3][0]]                         # one caption exactly a reference
    mean, per_image = Cider().compute_score(references, hypotheses)
    ours = CiderD(references).scores(list(hypotheses), [h[0] for h in hypotheses.values()])
    np.testing.assert_allclose(ours, per_image, rtol=1e-5, atol=1e-6)
    assert ours[3] == ours.max() and ours[3] > 1            # and the test is not trivially all zeros


def test_cider_d_document_frequencies_come_from_the_whole_corpus_not_the_batch():
    references = {1: ["two digits seven three"], 2: ["two digits seven seven"], 3: ["one digit three"]}
    reward = CiderD(references)
    alone = CiderD({1: references[1]}).scores([1], ["two digits seven three"])
    assert reward.scores([1], ["two digits seven three"])[0] > 0 and alone[0] == 0   # one document: every idf 0
    # the same caption scores the same whatever else is in the batch
    caption = "two digits seven three"
    assert reward.scores([1, 2], [caption, "x"])[0] == reward.scores([1], [caption])[0]


def test_digit_reward_is_one_for_the_right_digits_and_partial_for_one_wrong():
    assert edit_distance([6, 5, 0, 6], [6, 6, 6]) == 2 and edit_distance([], [1, 2]) == 2
    reward = DigitReward({1: [7, 2, 9], 2: None})
    scores = reward.scores([1, 1, 1, 1, 2], ["digits seven two nine", "three handwritten digits reading seven two",
                                             "seven two nine nine", "one", "seven"])
    np.testing.assert_allclose(scores, [1.0, 2 / 3, 3 / 4, 0.0, 0.0], rtol=1e-6)


def test_each_samples_baseline_is_the_mean_of_its_images_other_samples():
    rewards = np.array([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0]])
    np.testing.assert_allclose(steps.advantages(rewards), [[0.75, -0.75, 0.0], [0, 0, 0]])


def first_word_probabilities(model, features, start_id, banned):
    a, keys, state = model.encode(features)
    emb = model.embed(tf.fill([features.shape[0]], start_id))
    h, z, _, _ = model.step(emb, a, keys, state)
    logits = model.output_logits(emb, h, z).numpy()
    logits[:, banned] = -np.inf
    return tf.nn.softmax(logits).numpy()


def test_the_sampler_draws_k_captions_per_image_from_the_models_distribution():
    tf.keras.utils.set_random_seed(1)
    model = small_model()
    features = tf.random.stateless_normal((2, P, D), seed=(1, 2))
    k, start, end, unk = 1500, 1, 2, 3
    tokens = sampler_fn(model, k, 6, start, end, unk)(features)[0].numpy()
    assert tokens.shape == (2 * k, 6)
    assert not np.isin(tokens[:, 0], [0, start, unk]).any()   # <pad>, <start>, <unk> are never drawn
    want = first_word_probabilities(model, features, start, [0, start, unk])
    for image in range(2):                                    # image by image: rows image·k .. image·k + k − 1
        drawn = np.bincount(tokens[image * k:(image + 1) * k, 0], minlength=V) / k
        np.testing.assert_allclose(drawn, want[image], atol=0.04)
    assert len({tuple(row) for row in tokens[:k]}) > 10       # samples, not one caption repeated


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_a_self_critical_step_raises_a_rewarded_caption_and_lowers_a_punished_one(advantage):
    tf.keras.utils.set_random_seed(0)
    model = small_model()
    features = tf.random.stateless_normal((1, P, D), seed=(3, 4))
    samples = tf.constant([[[4, 5, 2, 0], [6, 7, 8, 2]]])    # (B=1, K=2, L): without <start>, 0 after <end>

    def log_p():
        words_in = tf.concat([tf.ones((1, 2, 1), tf.int32), samples[..., :-1]], -1)
        logits, _ = model(features, words_in)
        out = tf.reshape(samples, [2, -1])
        logp = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=out, logits=logits)
        return tf.reduce_sum(logp * tf.cast(out != 0, tf.float32), -1).numpy()

    before = log_p()
    settings = {**train_lib.DEFAULTS, "learning_rate": 0.01}
    optimizer = steps.make_optimizer(settings, steps_per_epoch=1)
    step = steps.make_scst_step(model, optimizer, tf.distribute.get_strategy(), settings, start_id=1)
    for _ in range(5):
        step(features, samples, tf.constant([[advantage, 0.0]]))   # the second sample is only as good as average
    change = log_p()[0] - before[0]
    assert change * advantage > 0.5


def test_self_critical_epochs_start_from_the_best_cross_entropy_epoch(extracted):
    """Four cross-entropy epochs of which the third is the best (a rate that overshoots in the fourth), then one
    self-critical epoch at a rate too small to move the weights: it validates exactly as the third epoch did,
    not as the last; its rewards are those of its reward."""
    workdir = extracted
    import json
    from tests.conftest import assert_real_picture, run_luigi
    base = ("--training-epochs", "4", "--training-patience", "9", "--training-learning-rate", "0.02",
            "--training-select-by", "cider", "--training-scst-epochs", "1", "--training-scst-learning-rate", "1e-12",
            "--training-scst-batch-size", "8")
    for reward in ("cider", "digits"):   # the second run reuses the features
        run = run_luigi("TrainDecoder", *base, "--training-scst-reward", reward, workdir=workdir)
        assert run.returncode == 0, run.output
        assert "epoch 5, self-critical 1/1, step 3/3" in run.output   # 24 train images, 8 per step
        model_dir, = [d for d in workdir.glob("models/[!.]*")
                      if json.loads((d / "config.json").read_text())["scst_reward"] == reward]
        history = json.loads((model_dir / "history.json").read_text())
        assert [h["phase"] for h in history] == ["xent"] * 4 + ["scst"]
        kept = [h for h in history[:4] if h["best"]][-1]
        assert kept["epoch"] != 4, "the test needs a best epoch before the last"
        for key in ("val_CIDEr", "val_Bleu_4", "example"):
            assert history[4][key] == kept[key], key
        assert np.isfinite(history[4]["loss"])
        assert history[4]["reward_name"] == {"cider": "CIDEr-D", "digits": "digit reward"}[reward]
        assert 0 < history[4]["reward"] <= (10.0 if reward == "cider" else 1.0)
        assert_real_picture(model_dir / "curves.png")
