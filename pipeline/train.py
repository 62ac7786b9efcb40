"""Training the decoder: the cross-entropy epochs, then the self-critical ones, then the model directory.

The parts, one job each: pipeline/steps.py (devices, optimizer, the compiled steps), pipeline/checkpoints.py
(the checkpointed training state), pipeline/validation.py (validation and epoch selection),
pipeline/self_critical.py (the self-critical epochs).

Input: pipeline/inputs.py (padded (image, caption) batches streamed from the HDF5 shards).
Training: Adam with global-norm clipping and an optional schedule, a compiled step run under a tf.distribute
strategy (MirroredStrategy over several GPUs, default strategy otherwise), optional mixed precision and XLA.
Checkpoints (model, optimizer, counters) every `checkpoint_every` steps and at each epoch end, in a
directory outside the task output. Each epoch ends with free-running decoding of the val split with the
[generation] settings (beam, length penalty, <unk> suppression: what GenerateCaptions will run) scored with
BLEU-4 and CIDEr-D (and the val scores of plug-in metrics whose truth the val images declare); the best
epoch's weights are kept — best by val CIDEr-D, or by the plug-in val score `select_by` names, CIDEr-D breaking
ties (validation.selection_key) — and training stops early after `patience` epochs without a better one. A
small dataset trains more epochs than `epochs`: as many as hold `min_steps` steps (epochs_to_train), with the
patience scaled alike (patience_for). With `scst_epochs` > 0, self-critical epochs follow (self_critical:
REINFORCE on sampled captions, rewarded with CIDEr-D or a plug-in's reward), starting from the best
cross-entropy epoch and validated and kept the same way. Loss parts, learning rate, speed and validation
scores also go to TensorBoard (pipeline/tensorboard.py: checkpoints/<fp>/tensorboard/).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipeline import defaults, extensions
from pipeline.checkpoints import TrainingState, exclusive_lock
from pipeline.errors import InputError
from pipeline.inputs import batches_per_epoch, caption_ids, count_pairs, pairs_dataset, shard_rows
from pipeline.self_critical import self_critical
from pipeline.steps import make_train_step, split_cpu
from pipeline.tensorboard import TrainingBoard
from pipeline.validation import end_epoch, selection_name, report_progress, shown
from pipeline.vocabulary import Vocabulary
from storage import manifests, shards
from storage.workspace import write_json

log = logging.getLogger("captioner")

# What a caller passing no settings gets (tests, benchmarks): the defaults of configs/luigi.cfg, where the Luigi
# config sections read them too. Validation decodes exactly as GenerateCaptions will, so the best epoch is chosen
# for it.
DEFAULTS = {**defaults.section("decoder"), **defaults.section("training"),
            "decoding": {k: v for k, v in defaults.section("generation").items()
                         if k in ("beam_size", "max_length", "length_penalty", "suppress_unk")}}


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


def _train(outdir, checkpoint_dir: Path, store_dir, train_index, val_index, annotations_dir, vocab_path,
           settings: dict, provenance, progress_callback) -> list:
    """train_decoder's run: the data, the (restored) training state, epochs until `epochs` or `patience` epochs
    without a better epoch (`select_by`), then the model directory with the best epoch's weights."""
    import keras

    vocab = Vocabulary.load(vocab_path)
    keras.utils.set_random_seed(settings["seed"])
    data = _load_data(store_dir, train_index, val_index, annotations_dir, vocab, settings)
    epochs = epochs_to_train(settings, data.steps_per_epoch)
    settings = {**settings, "epochs": epochs, "patience": patience_for(settings, epochs)}
    if settings["select_by"] != "cider":
        metrics = extensions.metrics_for(settings["select_by"])
        if metrics is None or not metrics.declares(data.val_records.values()):
            raise InputError(f"[training] select_by = {settings['select_by']}, but "
                             + (f"no val image declares its truth (\"{metrics.truth_key}\" in its annotation entry)"
                                if metrics else "no plug-in of [dataset] plugins offers that val score")
                             + ". Fix: select_by = cider.")
    state = TrainingState(Path(checkpoint_dir), data, len(vocab), settings)
    train_step = make_train_step(state.model, state.optimizer, state.strategy, settings)
    board = TrainingBoard(checkpoint_dir)
    while not state.self_critical_started() and state["epoch"] < settings["epochs"] and \
            state["bad_epochs"] < settings["patience"]:
        losses, seen, seconds = _train_epoch(state, data, train_step, board, settings, progress_callback)
        loss, xent, attention = np.mean(losses, axis=0).tolist() if losses else [None] * 3   # none: resumed at its end
        summary = {"phase": "xent", "loss": loss, "xent": xent, "attention": attention,
                   "attention_lambda": settings["attention_lambda"]}
        end_epoch(state, data, vocab, summary, f"epoch {state['epoch'] + 1}/{settings['epochs']}: loss {shown(loss)} "
                   f"(xent {shown(xent)} + {settings['attention_lambda']:g} × attention {shown(attention)})", seen, seconds,
                   board, settings)
    _stopped_early(state, settings)
    if settings["scst_epochs"]:
        self_critical(state, data, vocab, board, settings, progress_callback)
        _stopped_early(state, settings)
    board.close()
    write_model_dir(outdir, state.best_weights, state.model, vocab_path, settings, state.history, provenance or {})
    return state.history


def epochs_to_train(settings: dict, steps_per_epoch: int) -> int:
    """[training] epochs, raised until they hold at least `min_steps` steps: a small dataset trains about as many
    updates as a larger one would in `epochs` (the learning rate schedule then spans them all)."""
    epochs = max(settings["epochs"], -(-settings["min_steps"] // max(steps_per_epoch, 1)))
    if epochs > settings["epochs"]:
        log.info("training %d epochs instead of %d: [training] min_steps = %d at %d steps per epoch", epochs,
                 settings["epochs"], settings["min_steps"], steps_per_epoch)
    return epochs


def patience_for(settings: dict, epochs: int) -> int:
    """[training] patience, scaled as min_steps scaled the epochs: early stopping waits about as many steps as it
    would for the configured epochs (three of 25 short epochs are a noisy wait on a small val split)."""
    patience = -(-settings["patience"] * epochs // max(settings["epochs"], 1))
    if patience > settings["patience"]:
        log.info("patience %d epochs instead of %d, as the epochs were raised", patience, settings["patience"])
    return patience


def _stopped_early(state, settings: dict) -> None:
    if state["bad_epochs"] >= settings["patience"]:
        log.info("early stop: no better val %s for %d epochs", selection_name(settings["select_by"]),
                 settings["patience"])


def _load_data(store_dir, train_index, val_index, annotations_dir, vocab, settings: dict) -> SimpleNamespace:
    """Train rows and caption ids; val rows, references and records; feature shape; the batch of pairs
    and steps per epoch."""
    train_rows, val_rows = shard_rows(store_dir, train_index), shard_rows(store_dir, val_index)
    train_records = list(manifests.read_manifest(manifests.manifest_path(annotations_dir, "train")))
    captions = caption_ids(train_records, vocab)
    val_records = {r["image_id"]: r for r in manifests.read_manifest(manifests.manifest_path(annotations_dir, "val"))}
    positions, channels = shards.feature_shape(next(iter(train_rows)))
    layer = shards.read_attrs(next(iter(train_rows))).get("layer")
    n_pairs, n_images = count_pairs(train_rows, captions)
    batch, width = settings["batch_size"], settings["bucket_width"]
    steps = batches_per_epoch(train_rows, captions, batch, width)
    what = f"{batch} pairs" + (f" of similar caption lengths (bands of {width} tokens)" if width else "")
    data = SimpleNamespace(train_rows=train_rows, val_rows=val_rows, captions=captions, positions=positions,
                           channels=channels, layer=layer, batch=batch, steps_per_epoch=steps,
                           val_refs={i: r["captions"] for i, r in val_records.items()}, val_records=val_records,
                           train_records=train_records, train_images=n_images)
    log.info("training on %d (image, caption) pairs of %d images from %d shards, batches of %s: %d steps per epoch; "
             "validating on %d images", n_pairs, n_images, len(train_rows), what, steps, len(val_index["images"]))
    return data


def _train_epoch(state, data, train_step, board, settings: dict, progress_callback):
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
        loss, xent, attention_term, n = train_step(features, caps)
        state.counters["step"].assign_add(1)
        state.counters["step_in_epoch"].assign_add(1)
        losses.append((float(loss), float(xent), float(attention_term)))
        seen += int(n)
        now = time.monotonic()
        board.step(state["step"], *losses[-1], float(tf.convert_to_tensor(state.optimizer.learning_rate)),
                   int(n) / max(now - step_started, 1e-9))
        step_started = now
        if state["step"] % settings["checkpoint_every"] == 0:
            state.save()
        if now - last_log > 10 or state["step_in_epoch"] == data.steps_per_epoch:
            last_log, elapsed = now, now - start
            report_progress(progress_callback, epoch, settings["epochs"], state["step_in_epoch"], data.steps_per_epoch,
                    state["step"], total_steps, *losses[-1], seen / max(elapsed, 1e-9),
                    (total_steps - state["step"]) * elapsed / max(state["step_in_epoch"] - skip, 1),
                    settings["attention_lambda"])
    return losses, seen, time.monotonic() - start


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
