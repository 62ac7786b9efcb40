"""One training's state, checkpointed: model, optimizers, counters and history, restored from the latest
checkpoint of its directory; and the lock that keeps two processes from training into one directory."""
from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path

from pipeline.errors import InputError
from pipeline.inputs import feature_statistics
from pipeline.steps import build_model, make_optimizer, make_strategy
from pipeline.validation import selection_name
from storage import manifests

log = logging.getLogger("captioner")


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


class TrainingState:
    """Model, optimizer, counters and history of one training, checkpointed together in `checkpoint_dir` and
    restored from its latest checkpoint. state[name] reads a counter: epoch, step, step_in_epoch, best (the best
    epoch's val CIDEr-D, or the plug-in val score select_by names), bad_epochs."""

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
                     selection_name(settings["select_by"]), self["best"])
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
