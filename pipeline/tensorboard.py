"""TensorBoard event files of a decoder training: `checkpoints/<fp>/tensorboard/` (`tensorboard --logdir work/`).

One writer per training process, appending to the same directory: a resumed run continues the same curves,
because the step numbers come from the checkpointed step counter. (Steps trained after the last checkpoint of
a killed run are trained, and logged, again; TensorBoard shows the later points.)

    per step    train/loss, train/xent, train/attention (the doubly stochastic term, before λ),
                train/learning_rate, train/captions_per_second;
                self-critical epochs: train/scst_loss, train/scst_reward (the mean reward of the samples)
    per epoch   val/Bleu_4, val/CIDEr-D, val/<score> (a plug-in's val scores), val/distinct_captions,
                text val/examples: a few val images' captions beside a reference
"""
from __future__ import annotations

from pathlib import Path

DIRECTORY = "tensorboard"
EXAMPLES = 4


class TrainingBoard:
    def __init__(self, checkpoint_dir):
        import tensorflow as tf

        self._tf = tf
        self.path = Path(checkpoint_dir) / DIRECTORY
        self._writer = tf.summary.create_file_writer(str(self.path))

    def step(self, step: int, loss: float, xent: float, attention: float, learning_rate: float,
             captions_per_second: float) -> None:
        self.scalars(step, {"train/loss": loss, "train/xent": xent, "train/attention": attention,
                            "train/learning_rate": learning_rate, "train/captions_per_second": captions_per_second})

    def scalars(self, step: int, values: dict) -> None:
        with self._writer.as_default(step=step):
            for tag, value in values.items():
                self._tf.summary.scalar(tag, value)

    def epoch(self, step: int, scores: dict, extra: dict, distinct: int, hypotheses: dict,
              references: dict) -> None:
        with self._writer.as_default(step=step):
            self._tf.summary.scalar("val/Bleu_4", scores["Bleu_4"])
            self._tf.summary.scalar("val/CIDEr-D", scores["CIDEr"])
            self._tf.summary.scalar("val/distinct_captions", distinct)
            for key, value in extra.items():   # plug-in val scores (extensions.Metrics.val_scores)
                self._tf.summary.scalar(f"val/{key}", value)
            rows = [f"| {image_id} | {hypotheses[image_id]} | {references[image_id][0]} |"
                    for image_id in sorted(hypotheses)[:EXAMPLES]]
            self._tf.summary.text("val/examples", "\n".join(["| image | caption | a reference |", "|---|---|---|",
                                                              *rows]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
