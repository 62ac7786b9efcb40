"""Self-critical epochs (Rennie et al. 2017) after the cross-entropy ones: sampled captions rewarded with
CIDEr-D (or a plug-in's reward, extensions.REWARDS), each against the mean reward of its image's other samples."""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from pipeline import extensions
from pipeline.decode import sampler_fn
from pipeline.errors import InputError
from pipeline.inputs import pairs_dataset
from pipeline.progress import format_seconds
from pipeline.steps import advantages, make_scst_step
from pipeline.validation import end_epoch, shown

log = logging.getLogger("captioner")



def self_critical(state, data, vocab, board, settings: dict, progress_callback) -> None:
    """[training] scst_epochs > 0: self-critical sequence training (Rennie et al. 2017) after the cross-entropy
    epochs, from the best one's weights. Each step samples `scst_samples` captions per image (pipeline/decode.py
    sampler_fn), rewards each (`scst_reward`: CIDEr-D against the image's references with the
    training corpus' document frequencies, pipeline/rewards.py, or a plug-in's), subtracts the mean reward
    of the image's other samples (advantages) and takes a make_scst_step. Each epoch is validated and kept
    like a cross-entropy one, so the model directory holds a self-critical epoch only if it scored better."""
    from pipeline.rewards import CiderD

    if settings["scst_reward"] == "cider":
        name, reward = "CIDEr-D", CiderD({r["image_id"]: r["captions"] for r in data.train_records})
    elif settings["scst_reward"] in extensions.REWARDS:
        name, factory = extensions.REWARDS[settings["scst_reward"]]
        reward = factory(data.train_records)
    else:
        raise InputError(f"[training] scst_reward = {settings['scst_reward']}: no plug-in of [dataset] plugins "
                         "offers that reward. Fix: scst_reward = cider.")
    if not state.self_critical_started():   # from the kept epoch's weights, with a fresh patience
        if state.best_weights.exists():
            state.model.load_weights(str(state.best_weights))
        state.counters["bad_epochs"].assign(0)
    d = settings["decoding"]
    sampler = sampler_fn(state.model, settings["scst_samples"], d["max_length"], vocab.index["<start>"],
                         vocab.index["<end>"], vocab.index["<unk>"] if d["suppress_unk"] else None)
    step = make_scst_step(state.model, state.scst_optimizer, state.strategy, settings, vocab.index["<start>"])
    while (done := sum(e.get("phase") == "scst" for e in state.history)) < settings["scst_epochs"] and \
            state["bad_epochs"] < settings["patience"]:
        label = f"epoch {state['epoch'] + 1}, self-critical {done + 1}/{settings['scst_epochs']}"
        values, seen, seconds = scst_epoch(state, data, vocab, sampler, (name, reward), step, label, board,
                                            settings, progress_callback)
        loss, mean_reward = np.mean(values, axis=0).tolist() if values else [None] * 2
        end_epoch(state, data, vocab, {"phase": "scst", "loss": loss, "reward": mean_reward, "reward_name": name},
                   f"{label}: loss {shown(loss)}, mean sample {name} {shown(mean_reward)}", seen, seconds, board, settings)


def scst_epoch(state, data, vocab, sampler, reward, step, label: str, board, settings: dict,
                progress_callback):
    """One self-critical epoch over the train images (or its rest after a resume), `reward` (its name, the reward):
    → (per-step (loss, mean reward), captions sampled, seconds). Checkpoints every `checkpoint_every` steps; logs progress every 10 s."""
    import tensorflow as tf

    (name, reward), k = reward, settings["scst_samples"]
    skip, start = state["step_in_epoch"], time.monotonic()
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
                       f"{name} {np.mean([v[1] for v in values]):.4f}, "
                       f"{seen / (now - start):.1f} captions sampled/s, ETA "
                       f"{format_seconds((steps - state['step_in_epoch'] + epochs_left * steps) * per_step)} "
                       "(+ validation)")
            log.info(message)
            if progress_callback is not None:
                progress_callback(min(int(100 * state["step_in_epoch"] / steps), 100), message)
    return values, seen, time.monotonic() - start
