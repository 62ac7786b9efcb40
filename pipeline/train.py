"""Training the decoder: compiled train step, validation, checkpoints, the model directory.

Input: pipeline/inputs.py (padded (image, caption) batches streamed from the HDF5 shards).
Training: Adam with global-norm clipping and an optional schedule, a compiled step run under a tf.distribute
strategy (MirroredStrategy over several GPUs, default strategy otherwise), optional mixed precision and XLA.
Checkpoints (model, optimizer, counters) every `checkpoint_every` steps and at each epoch end, in a
directory outside the task output. Each epoch ends with free-running decoding of the val split with the
[generation] settings (beam, length penalty, <unk> suppression: what GenerateCaptions will run) scored with
BLEU-4 and CIDEr-D (and digits exact when the val images have digit labels); the best epoch's weights are
kept — best by val CIDEr-D, or with `select_by = digits_exact` by val digits exact, CIDEr-D breaking ties
(selection_key) — and training stops early after `patience` epochs without a better one. With `scst_epochs` > 0,
self-critical
epochs follow (_self_critical: REINFORCE on sampled captions, rewarded with CIDEr-D or the digit reward of
pipeline/rewards.py), starting from the best cross-entropy epoch and validated and kept the same way. Loss
parts, learning rate, speed and validation scores also go to TensorBoard (pipeline/tensorboard.py:
checkpoints/<fp>/tensorboard/).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipeline import digits
from pipeline.decode import decoder_fn
from pipeline.errors import InputError
from pipeline.encoder import LAYERS
from pipeline.evaluate import validation_scores
from pipeline.inputs import (batches_per_epoch, caption_ids, count_pairs, feature_batches, feature_statistics,
                             pairs_dataset, shard_rows)
from pipeline.model import ShowAttendTell, caption_loss
from pipeline.progress import format_seconds
from pipeline.tensorboard import TrainingBoard
from pipeline.vocabulary import Vocabulary
from storage import manifests, shards
from storage.workspace import atomic_file, write_json

log = logging.getLogger("captioner")

DEFAULTS = dict(
    # [decoder]
    feature_dim=512, attention_dim=512, embed_dim=256, units=512, dropout=0.5, cell="lstm", positions=False,
    attention_keys="features", context_scores=False, location=0,
    # [training]
    epochs=20, batch_size=64, learning_rate=4e-4, lr_schedule="constant", lr_decay=0.8, clip_norm=5.0,
    attention_lambda=1.0, patience=5, select_by="cider", bucket_width=0,
    scst_epochs=0, scst_reward="cider", scst_samples=5, scst_batch_size=16, scst_learning_rate=5e-5,
    checkpoint_every=500,
    shuffle_buffer=1000, block_rows=256,
    seed=0,
    precision="float32", jit_compile=False, strategy="auto", val_batch_size=128, cpu_devices=1,
    # [generation]: validation decodes exactly as GenerateCaptions will, so the best epoch is chosen for it
    decoding=dict(beam_size=3, max_length=20, length_penalty=1.0, suppress_unk=True),
)
DECODER_KEYS = ("feature_dim", "attention_dim", "embed_dim", "units", "dropout", "cell", "positions",
                "context_scores", "location")
SELECTION_NAMES = {"cider": "CIDEr-D", "digits_exact": "digits exact (CIDEr-D breaking ties)"}
REWARD_NAMES = {"cider": "CIDEr-D", "digits": "digit reward"}


def selection_key(entry: dict, select_by: str) -> tuple:
    """What ranks an epoch's history entry: (val CIDEr-D,) or (val digits exact, val CIDEr-D)."""
    if select_by == "digits_exact":
        return entry["val_digits_exact"], entry["val_CIDEr"]
    return (entry["val_CIDEr"],)


# -------------------------------------------------------------------------------------------- model bits

def split_cpu(n: int) -> None:
    """Present the CPU as `n` logical devices, so MirroredStrategy runs without GPUs (tests, CI). Must run
    before TensorFlow initialises its devices in this process."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as e:
        raise RuntimeError(f"[training] cpu_devices = {n} needs a fresh process: TensorFlow already set up its "
                           f"devices here ({e}). Run TrainDecoder on its own after ExtractFeatures.") from e


def make_strategy(kind: str = "auto"):
    """auto: MirroredStrategy when several GPUs are visible, else the default strategy; mirrored: over all
    GPUs, or all logical CPUs when there is no GPU (how the tests exercise it); default: one device."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def build_model(vocab_size: int, settings: dict, channels: int = 2048, layer: str | None = None):
    return ShowAttendTell(vocab_size, feature_channels=channels, key_channels=key_channels(settings, layer),
                          **{k: settings[k] for k in DECODER_KEYS})


def key_channels(settings: dict, layer: str | None) -> int:
    """How many trailing feature channels the attention keys are computed from: 0 (all features) for
    `attention_keys = features`; for `cell_scores`, the cell scores of a `+cell_scores` layer."""
    if settings["attention_keys"] == "features":
        return 0
    n = LAYERS.get(layer, {}).get("cell_scores", 0) if layer else 0
    if not n:
        raise InputError(f"[decoder] attention_keys = cell_scores: the features ({layer}) carry no cell scores. "
                         f"Fix: set [encoder] layer = {layer or 'mixed7'}+cell_scores (with weights = digits), or "
                         "[decoder] attention_keys = features.")
    return n


def make_optimizer(settings: dict, steps_per_epoch: int):
    import keras

    lr = settings["learning_rate"]
    if settings["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(steps_per_epoch * settings["epochs"], 1))
    elif settings["lr_schedule"] == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=max(steps_per_epoch, 1),
                                                         decay_rate=settings["lr_decay"], staircase=True)
    optimizer = keras.optimizers.Adam(lr, global_clipnorm=settings["clip_norm"] or None)
    if settings["precision"] == "mixed_float16":   # float16 gradients underflow without it; bfloat16's do not
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def decoded_captions(model, by_shard, vocab: Vocabulary, decoding: dict, batch_size: int,
                     block_rows: int = 256) -> dict[int, str]:
    """{image_id: caption} for every image of a split index, decoded with the [generation] settings `decoding`
    (beam_size, max_length, length_penalty, suppress_unk), as GenerateCaptions decodes."""
    decode = decoder_fn(model, vocab, **decoding)
    out = {}
    for ids, feats in feature_batches(by_shard, batch_size, block_rows):
        tokens = decode(feats)[0]
        for image_id, row in zip(ids.tolist(), tokens.numpy()):
            out[image_id] = vocab.decode(row)
    return out


# ---------------------------------------------------------------------------------------------- training

def train_decoder(outdir, checkpoint_dir, store_dir, train_index: dict, val_index: dict, annotations_dir,
                  vocab_path, settings: dict, provenance: dict | None = None, progress_callback=None) -> dict:
    """Train (or resume) and write the model directory `outdir`. Returns the history."""
    import keras

    settings = {**DEFAULTS, **settings}
    if not val_index["images"]:
        raise InputError("the val split has no images with features, and training validates on it. "
                         "Fix: set [dataset] val_fraction above 0 (or use a split file with val images).")
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(checkpoint_dir / ".lock"):
        if settings["cpu_devices"] > 1:
            split_cpu(settings["cpu_devices"])
        policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(settings["precision"])   # float32, mixed_bfloat16, mixed_float16
        try:
            return _train(outdir, checkpoint_dir, store_dir, train_index, val_index, annotations_dir, vocab_path,
                          settings, provenance, progress_callback)
        finally:   # later work in this process (feature extraction) must not inherit reduced-precision compute
            keras.mixed_precision.set_global_policy(policy)


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive lock on `path` (fcntl, released when the process dies): two overlapping runs that
    train the same model would otherwise interleave their checkpoints."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{path.parent}: another process is training this model right now "
                             "(it holds the lock). Fix: let it finish; a rerun afterwards finds its output.") from None
        yield


def _train(outdir, checkpoint_dir: Path, store_dir, train_index, val_index, annotations_dir, vocab_path,
           settings: dict, provenance, progress_callback) -> list:
    """train_decoder's run: the data, the (restored) training state, epochs until `epochs` or `patience` epochs
    without a better epoch (`select_by`), then the model directory with the best epoch's weights."""
    import keras

    vocab = Vocabulary.load(vocab_path)
    keras.utils.set_random_seed(settings["seed"])
    data = _load_data(store_dir, train_index, val_index, annotations_dir, vocab, settings)
    if settings["select_by"] == "digits_exact" and not any(data.val_digits.values()):
        raise InputError("[training] select_by = digits_exact, but no val image has digit labels (\"digits\" in "
                         "its annotation entry). Fix: select_by = cider.")
    state = _TrainingState(Path(checkpoint_dir), data, len(vocab), settings)
    train_step = make_train_step(state.model, state.optimizer, state.strategy, settings)
    board = TrainingBoard(checkpoint_dir)
    while not state.self_critical_started() and state["epoch"] < settings["epochs"] and \
            state["bad_epochs"] < settings["patience"]:
        losses, seen, seconds = _train_epoch(state, data, train_step, board, settings, progress_callback)
        loss, xent, attention = np.mean(losses, axis=0).tolist() if losses else [None] * 3   # none: resumed at its end
        summary = {"phase": "xent", "loss": loss, "xent": xent, "attention": attention,
                   "attention_lambda": settings["attention_lambda"]}
        _end_epoch(state, data, vocab, summary, f"epoch {state['epoch'] + 1}/{settings['epochs']}: loss {_f(loss)} "
                   f"(xent {_f(xent)} + {settings['attention_lambda']:g} × attention {_f(attention)})", seen, seconds,
                   board, settings)
    _stopped_early(state, settings)
    if settings["scst_epochs"]:
        _self_critical(state, data, vocab, board, settings, progress_callback)
        _stopped_early(state, settings)
    board.close()
    write_model_dir(outdir, state.best_weights, state.model, vocab_path, settings, state.history, provenance or {})
    return state.history


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _stopped_early(state, settings: dict) -> None:
    if state["bad_epochs"] >= settings["patience"]:
        log.info("early stop: no better val %s for %d epochs", SELECTION_NAMES[settings["select_by"]],
                 settings["patience"])


def _load_data(store_dir, train_index, val_index, annotations_dir, vocab, settings: dict) -> SimpleNamespace:
    """Train rows and caption ids; val rows, references and expected digits; feature shape; the batch of pairs
    and steps per epoch."""
    train_rows, val_rows = shard_rows(store_dir, train_index), shard_rows(store_dir, val_index)
    train_records = list(manifests.read_manifest(manifests.manifest_path(annotations_dir, "train")))
    captions = caption_ids(train_records, vocab)
    val_records = manifests.read_manifest(manifests.manifest_path(annotations_dir, "val"))
    positions, channels = shards.feature_shape(next(iter(train_rows)))
    layer = shards.read_attrs(next(iter(train_rows))).get("layer")
    n_pairs, n_images = count_pairs(train_rows, captions)
    batch, width = settings["batch_size"], settings["bucket_width"]
    steps = batches_per_epoch(train_rows, captions, batch, width)
    what = f"{batch} pairs" + (f" of similar caption lengths (bands of {width} tokens)" if width else "")
    data = SimpleNamespace(train_rows=train_rows, val_rows=val_rows, captions=captions, positions=positions,
                           channels=channels, layer=layer, batch=batch, steps_per_epoch=steps,
                           val_refs={r["image_id"]: r["captions"] for r in val_records},
                           val_digits={r["image_id"]: digits.expected_digits(r) for r in val_records},
                           train_records=train_records, train_images=n_images)
    log.info("training on %d (image, caption) pairs of %d images from %d shards, batches of %s: %d steps per epoch; "
             "validating on %d images", n_pairs, n_images, len(train_rows), what, steps, len(val_index["images"]))
    return data


class _TrainingState:
    """Model, optimizer, counters and history of one training, checkpointed together in `checkpoint_dir` and
    restored from its latest checkpoint. state[name] reads a counter: epoch, step, step_in_epoch, best (the best
    epoch's val CIDEr-D, or digits exact with select_by = digits_exact), bad_epochs."""

    def __init__(self, checkpoint_dir: Path, data, vocab_size: int, settings: dict):
        import tensorflow as tf

        self.strategy = make_strategy(settings["strategy"])
        log.info("strategy %s over %d replica(s)", type(self.strategy).__name__, self.strategy.num_replicas_in_sync)
        with self.strategy.scope():
            self.model = build_model(vocab_size, settings, data.channels, data.layer)
            self.model(tf.zeros((1, data.positions, data.channels), tf.float16), tf.zeros((1, 1), tf.int32))
            self.optimizer = make_optimizer(settings, data.steps_per_epoch)
            self.optimizer.build(self.model.trainable_variables)
            # self-critical epochs have their own optimizer: a constant small rate, fresh moments
            extra = {}
            if settings["scst_epochs"]:
                self.scst_optimizer = extra["scst_optimizer"] = make_optimizer(
                    {**settings, "learning_rate": settings["scst_learning_rate"], "lr_schedule": "constant"}, 1)
                self.scst_optimizer.build(self.model.trainable_variables)
            self.counters = {name: tf.Variable(value, trainable=False, name=name, dtype=dtype)
                             for name, value, dtype in (("epoch", 0, tf.int64), ("step", 0, tf.int64),
                                                        ("step_in_epoch", 0, tf.int64), ("best", -1.0, tf.float64),
                                                        ("bad_epochs", 0, tf.int64))}
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, **self.counters, **extra)
        self.manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=2)
        self.history_path, self.best_weights = checkpoint_dir / "history.json", checkpoint_dir / "best.weights.h5"
        self.history = []
        if self.manager.latest_checkpoint:
            checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
            history = manifests.read_json(self.history_path) if self.history_path.exists() else []
            self.history = history[:self["epoch"]]   # epochs after the checkpoint are trained again
            log.info("resuming from checkpoint %s: epoch %d, step %d (%d into the epoch), best val %s %.4f",
                     self.manager.latest_checkpoint, self["epoch"] + 1, self["step"], self["step_in_epoch"],
                     SELECTION_NAMES[settings["select_by"]], self["best"])
        else:   # a resumed run restored them with the checkpoint
            mean, std = feature_statistics(data.train_rows, settings["block_rows"])
            self.model.feature_mean.assign(mean)
            self.model.feature_std.assign(std)

    def self_critical_started(self) -> bool:
        """True once a self-critical step has run (its optimizer's step count is checkpointed with the rest)."""
        return hasattr(self, "scst_optimizer") and int(self.scst_optimizer.iterations.numpy()) > 0

    def __getitem__(self, name: str):
        return self.counters[name].numpy().item()

    def save(self) -> None:
        self.manager.save(checkpoint_number=self.counters["step"])


def _train_epoch(state: _TrainingState, data, train_step, board, settings: dict, progress_callback):
    """One epoch, or its rest after a resume mid-epoch: → (per-step (loss, xent, attention), captions, seconds).
    Checkpoints every `checkpoint_every` steps; logs progress every 10 s."""
    import tensorflow as tf

    epoch, skip = state["epoch"], state["step_in_epoch"]
    total_steps = data.steps_per_epoch * settings["epochs"]
    ds = pairs_dataset(data.train_rows, data.captions, data.batch, settings["seed"], epoch, settings["shuffle_buffer"],
                       settings["block_rows"], data.positions, data.channels,
                       bucket_width=settings["bucket_width"]).skip(skip)
    ds = state.strategy.experimental_distribute_dataset(ds.map(lambda ids, f, c: (f, c)))
    start = last_log = step_started = time.monotonic()
    seen, losses = 0, []
    for features, caps in ds:
        loss, xent, doubly, n = train_step(features, caps)
        state.counters["step"].assign_add(1)
        state.counters["step_in_epoch"].assign_add(1)
        losses.append((float(loss), float(xent), float(doubly)))
        seen += int(n)
        now = time.monotonic()
        board.step(state["step"], *losses[-1], float(tf.convert_to_tensor(state.optimizer.learning_rate)),
                   int(n) / max(now - step_started, 1e-9))
        step_started = now
        if state["step"] % settings["checkpoint_every"] == 0:
            state.save()
        if now - last_log > 10 or state["step_in_epoch"] == data.steps_per_epoch:
            last_log, elapsed = now, now - start
            _report(progress_callback, epoch, settings["epochs"], state["step_in_epoch"], data.steps_per_epoch,
                    state["step"], total_steps, *losses[-1], seen / max(elapsed, 1e-9),
                    (total_steps - state["step"]) * elapsed / max(state["step_in_epoch"] - skip, 1))
    return losses, seen, time.monotonic() - start


def _self_critical(state: _TrainingState, data, vocab, board, settings: dict, progress_callback) -> None:
    """[training] scst_epochs > 0: self-critical sequence training (Rennie et al. 2017) after the cross-entropy
    epochs, from the best one's weights. Each step samples `scst_samples` captions per image (pipeline/decode.py
    greedy_fn, samples = K), rewards each (`scst_reward`: CIDEr-D against the image's references with the
    training corpus' document frequencies, or the digit reward; pipeline/rewards.py), subtracts the mean reward
    of the image's other samples (advantages) and takes a make_scst_step. Each epoch is validated and kept
    like a cross-entropy one, so the model directory holds a self-critical epoch only if it scored better."""
    from pipeline.rewards import CiderD, DigitReward

    if settings["scst_reward"] == "digits":
        expected = {r["image_id"]: digits.expected_digits(r) for r in data.train_records}
        if not any(expected.values()):
            raise InputError("[training] scst_reward = digits, but no train image has digit labels (\"digits\" "
                             "in its annotation entry). Fix: scst_reward = cider.")
        reward = DigitReward(expected)
    else:
        reward = CiderD({r["image_id"]: r["captions"] for r in data.train_records})
    if not state.self_critical_started():   # from the kept epoch's weights, with a fresh patience
        if state.best_weights.exists():
            state.model.load_weights(str(state.best_weights))
        state.counters["bad_epochs"].assign(0)
    sampler = decoder_fn(state.model, vocab, **settings["decoding"], samples=settings["scst_samples"])
    step = make_scst_step(state.model, state.scst_optimizer, state.strategy, settings, vocab.index["<start>"])
    name = REWARD_NAMES[settings["scst_reward"]]
    while (done := sum(e.get("phase") == "scst" for e in state.history)) < settings["scst_epochs"] and \
            state["bad_epochs"] < settings["patience"]:
        label = f"epoch {state['epoch'] + 1}, self-critical {done + 1}/{settings['scst_epochs']}"
        values, seen, seconds = _scst_epoch(state, data, vocab, sampler, reward, step, label, board, settings,
                                            progress_callback)
        loss, mean_reward = np.mean(values, axis=0).tolist() if values else [None] * 2
        _end_epoch(state, data, vocab, {"phase": "scst", "loss": loss, "reward": mean_reward, "reward_name": name},
                   f"{label}: loss {_f(loss)}, mean sample {name} {_f(mean_reward)}", seen, seconds, board, settings)


def _scst_epoch(state: _TrainingState, data, vocab, sampler, reward, step, label: str, board, settings: dict,
                progress_callback):
    """One self-critical epoch over the train images (or its rest after a resume): → (per-step (loss, mean
    reward), captions sampled, seconds). Checkpoints every `checkpoint_every` steps; logs progress every 10 s."""
    import tensorflow as tf

    k, skip, start = settings["scst_samples"], state["step_in_epoch"], time.monotonic()
    steps = math.ceil(data.train_images / settings["scst_batch_size"])   # images with captions, as grouped batches
    epochs_left = settings["scst_epochs"] - sum(e.get("phase") == "scst" for e in state.history) - 1
    ds = pairs_dataset(data.train_rows, data.captions, settings["scst_batch_size"], settings["seed"], state["epoch"],
                       settings["shuffle_buffer"], settings["block_rows"], data.positions, data.channels,
                       group=True).skip(skip)
    values, seen, last_log = [], 0, start
    for ids, features, _ in ds:
        tokens = sampler(features)[0].numpy()                       # (B·K, L), image by image
        rewards = reward.scores(np.repeat(ids.numpy(), k), [vocab.decode(row) for row in tokens]).reshape(-1, k)
        loss, _ = step(features, tf.constant(tokens.reshape(rewards.shape[0], k, -1)), tf.constant(advantages(rewards)))
        values.append((float(loss), float(rewards.mean())))
        seen += len(tokens)
        state.counters["step"].assign_add(1)
        state.counters["step_in_epoch"].assign_add(1)
        board.scalars(state["step"], {"train/scst_loss": values[-1][0], "train/scst_reward": values[-1][1]})
        if state["step"] % settings["checkpoint_every"] == 0:
            state.save()
        now = time.monotonic()
        if now - last_log > 10 or state["step_in_epoch"] == steps:
            last_log, per_step = now, (now - start) / (state["step_in_epoch"] - skip)
            message = (f"{label}, step {state['step_in_epoch']}/{steps}: mean sample "
                       f"{REWARD_NAMES[settings['scst_reward']]} {np.mean([v[1] for v in values]):.4f}, "
                       f"{seen / (now - start):.1f} captions sampled/s, ETA "
                       f"{format_seconds((steps - state['step_in_epoch'] + epochs_left * steps) * per_step)} "
                       "(+ validation)")
            log.info(message)
            if progress_callback is not None:
                progress_callback(min(int(100 * state["step_in_epoch"] / steps), 100), message)
    return values, seen, time.monotonic() - start


def _end_epoch(state: _TrainingState, data, vocab, summary: dict, text: str, seen: int, seconds: float, board,
               settings: dict) -> None:
    """Validate the epoch's weights decoding as GenerateCaptions will, keep them when the epoch is the best so
    far (selection_key), record the epoch (history, log, TensorBoard) and checkpoint. `summary`: the history
    entry's training part (phase, loss ...), `text` its log form."""
    hyps = decoded_captions(state.model, data.val_rows, vocab, settings["decoding"], settings["val_batch_size"],
                            settings["block_rows"])
    scores = validation_scores(data.val_refs, hyps)
    exact = digits.digits_exact(hyps, data.val_digits)   # None unless the val images have digit labels
    entry = {"epoch": state["epoch"] + 1, **summary, "val_Bleu_4": scores["Bleu_4"],
             "val_CIDEr": scores["CIDEr"], **({"val_digits_exact": exact} if exact is not None else {}),
             "val_distinct": digits.distinct_captions(hyps), "seconds": round(seconds, 2),
             "captions_per_second": round(seen / max(seconds, 1e-9), 1), "best": False,
             "example": next(iter(hyps.values()), "")}
    key = lambda e: selection_key(e, settings["select_by"])
    improved = entry["best"] = all(key(entry) > key(e) for e in state.history)
    if improved:
        with atomic_file(state.best_weights, suffix=".weights.h5") as tmp:
            state.model.save_weights(str(tmp))
        state.counters["best"].assign(key(entry)[0])
        state.counters["bad_epochs"].assign(0)
    else:
        state.counters["bad_epochs"].assign_add(1)
    state.history.append(entry)
    log.info("%s, val BLEU-4 %.4f, CIDEr-D %.4f%s, %s%.0fs, %.1f captions/s", text, scores["Bleu_4"],
             scores["CIDEr"], " (best)" if improved else "",
             f"digits exact {exact:.3f}, " if exact is not None else "", seconds,
             state.history[-1]["captions_per_second"])
    board.epoch(state["step"], scores, exact, state.history[-1]["val_distinct"], hyps, data.val_refs)
    state.counters["epoch"].assign_add(1)
    state.counters["step_in_epoch"].assign(0)
    state.save()
    write_json(state.history_path, state.history)


def _update(model, optimizer, settings: dict, replicas: int, losses):
    """One optimizer update inside a replica: `losses()` → (loss, *more), computed under a gradient tape; the loss
    is divided among the replicas (and scaled under float16 mixed precision), its gradient applied.
    → (loss, *more)."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = losses()
        scaled = out[0] / replicas
        if settings["precision"] == "mixed_float16":
            scaled = optimizer.scale_loss(scaled)
    optimizer.apply(tape.gradient(scaled, model.trainable_variables), model.trainable_variables)
    return out


def make_train_step(model, optimizer, strategy, settings):
    """The compiled step: (features, captions) → (loss, xent, attention term, real captions), averaged over the
    replicas."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync

    def replica_step(features, captions):
        words_in, words_out = captions[..., :-1], captions[..., 1:]   # (B, T) or, grouped, (B, C, T)

        def losses():
            logits, alphas = model(features, words_in, training=True)
            return caption_loss(logits, alphas, tf.reshape(words_out, tf.shape(logits)[:2]),
                                settings["attention_lambda"])

        loss, xent, doubly = _update(model, optimizer, settings, replicas, losses)
        return loss, xent, doubly, tf.reduce_sum(tf.cast(captions[..., 0] != 0, tf.int32))   # real captions

    # XLA compiles one program per batch shape anyway, and needs each trace's caption length to be static
    @tf.function(jit_compile=settings["jit_compile"], reduce_retracing=not settings["jit_compile"])
    def step(features, captions):
        loss, xent, doubly, n = strategy.run(replica_step, args=(features, captions))
        mean = tf.distribute.ReduceOp.MEAN
        return (strategy.reduce(mean, loss, axis=None), strategy.reduce(mean, xent, axis=None),
                strategy.reduce(mean, doubly, axis=None), strategy.reduce(tf.distribute.ReduceOp.SUM, n, axis=None))

    return step


def make_scst_step(model, optimizer, strategy, settings, start_id: int):
    """The compiled self-critical step (Rennie et al. 2017): (features (B, P, D), sampled captions (B, K, L)
    without <start>, 0 after <end>, advantages (B, K)) → (loss, mean log-probability per word).

    loss = −Σ advantage · log p(word) over the sampled words (<end> included) / their number, the REINFORCE
    gradient with a baseline, as self-critical.pytorch's RewardCriterion. The log-probabilities come from a
    teacher-forced pass over the samples without dropout: the sampler (pipeline/decode.py greedy_fn, samples = K)
    draws without it too, so the gradient is of the policy that decodes. Under MirroredStrategy every replica
    gets the whole batch (it was sampled outside the strategy) and the replicas' gradients are averaged."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync

    def replica_step(features, tokens, advantages):
        words_in = tf.concat([tf.fill(tf.concat([tf.shape(tokens)[:2], [1]], 0), start_id), tokens[..., :-1]], -1)
        words_out = tf.reshape(tokens, [-1, tf.shape(tokens)[2]])                 # (B·K, L), image by image
        mask = tf.cast(words_out != 0, tf.float32)
        words = tf.maximum(tf.reduce_sum(mask), 1.0)

        def losses():
            logits, _ = model(features, words_in, training=False)
            logp = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=words_out, logits=logits)
            weighted = tf.reshape(advantages, [-1, 1]) * logp * mask
            return -tf.reduce_sum(weighted) / words, tf.reduce_sum(logp * mask) / words

        return _update(model, optimizer, settings, replicas, losses)

    @tf.function(reduce_retracing=True)
    def step(features, tokens, advantages):
        loss, logp = strategy.run(replica_step, args=(features, tokens, advantages))
        mean = tf.distribute.ReduceOp.MEAN
        return strategy.reduce(mean, loss, axis=None), strategy.reduce(mean, logp, axis=None)

    return step


def advantages(rewards):
    """(B, K) rewards of K samples per image → each minus the mean of its image's other K − 1 samples: the
    baseline of self-critical.pytorch's new_self_critical, which needs no greedy decoding."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(axis=1, keepdims=True) - rewards) / max(k - 1, 1)


def _report(callback, epoch, epochs, step_in_epoch, steps_per_epoch, step, total_steps, loss, xent, doubly, rate,
            eta_seconds):
    message = (f"epoch {epoch + 1}/{epochs}, step {step_in_epoch}/{steps_per_epoch} (total {step}/{total_steps}), "
               f"loss {loss:.4f} (xent {xent:.4f} + λ × attention {doubly:.4f}), {rate:.1f} captions/s, "
               f"ETA {format_seconds(eta_seconds)} (+ validation)")
    log.info(message)
    if callback is not None:
        callback(min(int(100 * step / max(total_steps, 1)), 100), message)


def write_model_dir(outdir, best_weights: Path, model, vocab_path, settings: dict, history: list, provenance: dict):
    """The self-contained model directory: decoder weights + config, vocabulary, settings, history, curves."""
    outdir = Path(outdir)
    if best_weights.exists():
        model.load_weights(str(best_weights))
    model.save_weights(str(outdir / "decoder.weights.h5"))
    write_json(outdir / "decoder.json", model.get_config())
    write_json(outdir / "vocab.json", manifests.read_json(vocab_path))
    write_json(outdir / "config.json", settings)
    write_json(outdir / "history.json", history)
    write_json(outdir / "features.json", provenance)
    from pipeline.plots import training_curves
    training_curves(history, outdir / "curves.png")
