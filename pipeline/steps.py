"""The compiled training steps and what they run on: devices and distribution strategy, the decoder as the
settings build it, the optimizer, one optimizer update, the cross-entropy step and the self-critical step.

Every step runs under a tf.distribute strategy (MirroredStrategy over several GPUs, or CPU logical devices in
tests; the default strategy otherwise), at [training] precision (float16 with loss scaling), optionally
XLA-compiled (jit_compile).
"""
from __future__ import annotations

import logging

from pipeline.encoder import LAYERS, base_layer
from pipeline.errors import InputError
from pipeline.model import ShowAttendTell, caption_loss

log = logging.getLogger("captioner")

DECODER_KEYS = ("feature_dim", "attention_dim", "embed_dim", "units", "dropout", "cell", "positions",
                "context_extras", "location", "query_word")


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
    return ShowAttendTell(vocab_size, feature_channels=channels, key_channels=key_channels(settings, layer, channels),
                          **{k: settings[k] for k in DECODER_KEYS})


def key_channels(settings: dict, layer: str | None, channels: int) -> int:
    """How many trailing feature channels the attention keys are computed from: 0 (all features) for
    `attention_keys = features`; for `extras`, the extra channels of a `+<extra>` layer (the features'
    `channels` beyond the base layer's)."""
    if settings["attention_keys"] == "features":
        return 0
    n = channels - LAYERS[base_layer(layer)]["channels"] if layer and "+" in layer else 0
    if n <= 0:
        raise InputError(f"[decoder] attention_keys = extras: the features ({layer}) carry no extra channels. "
                         f"Fix: set [encoder] layer to a plug-in's <layer>+<extra>, or [decoder] attention_keys = "
                         "features.")
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


def update(model, optimizer, settings: dict, replicas: int, losses):
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
    """The compiled step: (features, captions) → (loss, xent, attention term, real captions) of the global batch.

    Each replica divides its part of the loss by the real tokens of the whole global batch (summed over the
    replicas), and the replicas' gradients are summed: the update is the one a single device takes on the whole
    batch, however its tokens fall among the replicas."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    total = tf.distribute.ReduceOp.SUM

    def replica_step(features, captions):
        words_in, words_out = captions[..., :-1], captions[..., 1:]   # (B, T) or, grouped, (B, C, T)

        def losses():
            logits, alphas = model(features, words_in, training=True)
            targets = tf.reshape(words_out, tf.shape(logits)[:2])
            tokens = tf.reduce_sum(tf.cast(targets != 0, tf.float32))
            if replicas > 1:
                tokens = tf.distribute.get_replica_context().all_reduce(total, tokens)
            return caption_loss(logits, alphas, targets, settings["attention_lambda"], tokens)

        loss, xent, attention_term = update(model, optimizer, settings, 1, losses)   # already a share of the whole
        return loss, xent, attention_term, tf.reduce_sum(tf.cast(captions[..., 0] != 0, tf.int32))   # real captions

    # XLA compiles one program per batch shape anyway, and needs each trace's caption length to be static
    @tf.function(jit_compile=settings["jit_compile"], reduce_retracing=not settings["jit_compile"])
    def step(features, captions):
        parts = strategy.run(replica_step, args=(features, captions))
        return tuple(strategy.reduce(total, part, axis=None) for part in parts)

    return step


def make_scst_step(model, optimizer, strategy, settings, start_id: int):
    """The compiled self-critical step (Rennie et al. 2017): (features (B, P, D), sampled captions (B, K, L)
    without <start>, 0 after <end>, advantages (B, K)) → (loss, mean log-probability per word).

    loss = −Σ advantage · log p(word) over the sampled words (<end> included) / their number, the REINFORCE
    gradient with a baseline, as self-critical.pytorch's RewardCriterion. The log-probabilities come from a
    teacher-forced pass over the samples without dropout: the sampler (pipeline/decode.py sampler_fn, K samples)
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

        return update(model, optimizer, settings, replicas, losses)

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
