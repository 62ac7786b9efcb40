"""Training the decoder: compiled train step, validation, checkpoints, the model directory.

Input: pipeline/inputs.py (padded (image, caption) batches streamed from the HDF5 shards).
Training: Adam with global-norm clipping and an optional schedule, a compiled step run under a tf.distribute
strategy (MirroredStrategy over several GPUs, default strategy otherwise), optional mixed precision and XLA.
Checkpoints (model, optimizer, counters) every `checkpoint_every` steps and at each epoch end, in a
directory outside the task output. Each epoch ends with free-running decoding of the val split with the
[generation] settings (beam, length penalty, <unk> suppression: what GenerateCaptions will run) scored with
BLEU-4 and CIDEr-D; the best-CIDEr-D weights are kept; training stops early after `patience` epochs without a
better CIDEr-D. Loss parts, learning rate, speed and validation scores also go to TensorBoard
(pipeline/tensorboard.py: checkpoints/<fp>/tensorboard/).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import time
from pathlib import Path

import numpy as np

from pipeline import digits
from pipeline.decode import decoder_fn
from pipeline.errors import InputError
from pipeline.inputs import caption_ids, count_pairs, feature_batches, feature_statistics, pairs_dataset, shard_rows
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
    # [training]
    epochs=20, batch_size=64, learning_rate=4e-4, lr_schedule="constant", lr_decay=0.8, clip_norm=5.0,
    attention_lambda=1.0, patience=5, checkpoint_every=500, shuffle_buffer=1000, block_rows=256, seed=0,
    mixed_precision=False, jit_compile=False, strategy="auto", val_batch_size=128, cpu_devices=1,
    # [generation]: validation decodes exactly as GenerateCaptions will, so the best epoch is chosen for it
    decoding=dict(beam_size=3, max_length=20, length_penalty=1.0, suppress_unk=True),
)
DECODER_KEYS = ("feature_dim", "attention_dim", "embed_dim", "units", "dropout", "cell", "positions")


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


def build_model(vocab_size: int, settings: dict, channels: int = 2048):
    return ShowAttendTell(vocab_size, feature_channels=channels, **{k: settings[k] for k in DECODER_KEYS})


def make_optimizer(settings: dict, steps_per_epoch: int):
    import keras

    lr = settings["learning_rate"]
    if settings["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(steps_per_epoch * settings["epochs"], 1))
    elif settings["lr_schedule"] == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=max(steps_per_epoch, 1),
                                                         decay_rate=settings["lr_decay"], staircase=True)
    optimizer = keras.optimizers.Adam(lr, global_clipnorm=settings["clip_norm"] or None)
    if settings["mixed_precision"]:
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


def score(references: dict, hypotheses: dict) -> dict:
    """BLEU-4 and CIDEr-D (pycocoevalcap scorers on our normalised tokens; no Java needed)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {i: references[i] for i in hypotheses}
    res = {i: [hypotheses[i] or "<empty>"] for i in hypotheses}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"Bleu_4": float(bleu[3]), "CIDEr": float(cider)}


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
        if settings["mixed_precision"]:
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            return _train(outdir, checkpoint_dir, store_dir, train_index, val_index, annotations_dir, vocab_path,
                          settings, provenance, progress_callback)
        finally:   # later work in this process (feature extraction) must not inherit float16 compute
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
    import keras
    import tensorflow as tf

    vocab = Vocabulary.load(vocab_path)
    keras.utils.set_random_seed(settings["seed"])

    train_rows, val_rows = shard_rows(store_dir, train_index), shard_rows(store_dir, val_index)
    captions = caption_ids(manifests.read_manifest(manifests.manifest_path(annotations_dir, "train")), vocab)
    val_records = manifests.read_manifest(manifests.manifest_path(annotations_dir, "val"))
    val_refs = {r["image_id"]: r["captions"] for r in val_records}
    val_digits = {r["image_id"]: digits.expected_digits(r) for r in val_records}
    positions, channels = shards.feature_shape(next(iter(train_rows)))
    n_pairs = count_pairs(train_rows, captions)
    steps_per_epoch = math.ceil(n_pairs / settings["batch_size"])
    log.info("training on %d (image, caption) pairs from %d shards: %d steps per epoch; validating on %d images",
             n_pairs, len(train_rows), steps_per_epoch, len(val_index["images"]))

    strategy = make_strategy(settings["strategy"])
    log.info("strategy %s over %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    with strategy.scope():
        model = build_model(len(vocab), settings, channels)
        model(tf.zeros((1, positions, channels), tf.float16), tf.zeros((1, 1), tf.int32))   # create variables
        optimizer = make_optimizer(settings, steps_per_epoch)
        optimizer.build(model.trainable_variables)
        counters = {name: tf.Variable(value, trainable=False, name=name, dtype=dtype)
                    for name, value, dtype in (("epoch", 0, tf.int64), ("step", 0, tf.int64),
                                               ("step_in_epoch", 0, tf.int64), ("best", -1.0, tf.float64),
                                               ("bad_epochs", 0, tf.int64))}
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, **counters)
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=2)
    history_path = checkpoint_dir / "history.json"
    history = []
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        history = manifests.read_json(history_path) if history_path.exists() else []
        history = history[:int(counters["epoch"].numpy())]   # epochs after the checkpoint are trained again
        log.info("resuming from checkpoint %s: epoch %d, step %d (%d into the epoch), best CIDEr-D %.4f",
                 manager.latest_checkpoint, int(counters["epoch"].numpy()) + 1, int(counters["step"].numpy()),
                 int(counters["step_in_epoch"].numpy()), float(counters["best"].numpy()))

    if not manager.latest_checkpoint:   # a resumed run restored them with the checkpoint
        mean, std = feature_statistics(train_rows, settings["block_rows"])
        model.feature_mean.assign(mean)
        model.feature_std.assign(std)
    train_step = make_train_step(model, optimizer, strategy, settings)
    board = TrainingBoard(checkpoint_dir)
    best_weights = checkpoint_dir / "best.weights.h5"
    total_steps = steps_per_epoch * settings["epochs"]
    while int(counters["epoch"].numpy()) < settings["epochs"] and int(counters["bad_epochs"].numpy()) < settings["patience"]:
        epoch = int(counters["epoch"].numpy())
        skip = int(counters["step_in_epoch"].numpy())
        ds = pairs_dataset(train_rows, captions, settings["batch_size"], settings["seed"], epoch,
                           settings["shuffle_buffer"], settings["block_rows"], positions, channels).skip(skip)
        ds = strategy.experimental_distribute_dataset(ds.map(lambda ids, f, c: (f, c)))
        start, last_log, seen, losses = time.monotonic(), time.monotonic(), 0, []
        step_started = start
        for features, caps in ds:
            loss, xent, doubly, n = train_step(features, caps)
            counters["step"].assign_add(1)
            counters["step_in_epoch"].assign_add(1)
            losses.append((float(loss), float(xent), float(doubly)))
            seen += int(n)
            now = time.monotonic()
            board.step(int(counters["step"].numpy()), *losses[-1], float(tf.convert_to_tensor(optimizer.learning_rate)),
                       int(n) / max(now - step_started, 1e-9))
            step_started = now
            if int(counters["step"].numpy()) % settings["checkpoint_every"] == 0:
                manager.save(checkpoint_number=counters["step"])
            if time.monotonic() - last_log > 10 or int(counters["step_in_epoch"].numpy()) == steps_per_epoch:
                last_log, elapsed = time.monotonic(), time.monotonic() - start
                step_now, in_epoch = int(counters["step"].numpy()), int(counters["step_in_epoch"].numpy())
                _report(progress_callback, epoch, settings["epochs"], in_epoch, steps_per_epoch, step_now,
                        total_steps, float(loss), float(xent), float(doubly), seen / max(elapsed, 1e-9),
                        (total_steps - step_now) * elapsed / max(in_epoch - skip, 1))
        seconds = time.monotonic() - start
        hyps = decoded_captions(model, val_rows, vocab, settings["decoding"], settings["val_batch_size"],
                                settings["block_rows"])
        scores = score(val_refs, hyps)
        improved = scores["CIDEr"] > float(counters["best"].numpy())
        if improved:
            with atomic_file(best_weights, suffix=".weights.h5") as tmp:
                model.save_weights(str(tmp))
            counters["best"].assign(scores["CIDEr"])
            counters["bad_epochs"].assign(0)
        else:
            counters["bad_epochs"].assign_add(1)
        means = np.mean(losses, axis=0).tolist() if losses else [None] * 3
        exact = digits.digits_exact(hyps, val_digits)   # None unless the captions name digits (the demo)
        history.append({"epoch": epoch + 1, "loss": means[0], "xent": means[1], "attention": means[2],
                        "attention_lambda": settings["attention_lambda"], "val_Bleu_4": scores["Bleu_4"],
                        "val_CIDEr": scores["CIDEr"], "val_digits_exact": exact,
                        "val_distinct": digits.distinct_captions(hyps), "seconds": round(seconds, 2),
                        "captions_per_second": round(seen / max(seconds, 1e-9), 1), "best": improved,
                        "example": next(iter(hyps.values()), "")})
        log.info("epoch %d/%d: loss %.4f (xent %.4f + %g × attention %.4f), val BLEU-4 %.4f, CIDEr-D %.4f%s, "
                 "%s%.0fs, %.1f captions/s", epoch + 1, settings["epochs"], means[0] or float("nan"),
                 means[1] or float("nan"), settings["attention_lambda"], means[2] or float("nan"), scores["Bleu_4"],
                 scores["CIDEr"], " (best)" if improved else "",
                 f"digits exact {exact:.3f}, " if exact is not None else "", seconds,
                 history[-1]["captions_per_second"])
        board.epoch(int(counters["step"].numpy()), scores, exact, history[-1]["val_distinct"], hyps, val_refs)
        counters["epoch"].assign_add(1)
        counters["step_in_epoch"].assign(0)
        manager.save(checkpoint_number=counters["step"])
        write_json(history_path, history)
    board.close()
    if int(counters["bad_epochs"].numpy()) >= settings["patience"]:
        log.info("early stop: no better val CIDEr-D for %d epochs", settings["patience"])

    write_model_dir(outdir, best_weights, model, vocab_path, settings, history, provenance or {})
    return history


def make_train_step(model, optimizer, strategy, settings):
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync

    def replica_step(features, captions):
        words_in, words_out = captions[:, :-1], captions[:, 1:]
        with tf.GradientTape() as tape:
            logits, alphas = model(features, words_in, training=True)
            loss, xent, doubly = caption_loss(logits, alphas, words_out, settings["attention_lambda"])
            scaled = loss / replicas
            if settings["mixed_precision"]:
                scaled = optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss, xent, doubly, tf.shape(captions)[0]

    @tf.function(jit_compile=settings["jit_compile"], reduce_retracing=True)
    def step(features, captions):
        loss, xent, doubly, n = strategy.run(replica_step, args=(features, captions))
        mean = tf.distribute.ReduceOp.MEAN
        return (strategy.reduce(mean, loss, axis=None), strategy.reduce(mean, xent, axis=None),
                strategy.reduce(mean, doubly, axis=None), strategy.reduce(tf.distribute.ReduceOp.SUM, n, axis=None))

    return step


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
