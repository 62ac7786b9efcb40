"""Scene-phase step time of PretrainDigitsEncoder by `[pretrain] scene_train_from` (not run by pytest).

    python tests/benchmarks/bench_pretrain_freeze.py [--runs 3] [--steps 3]

One phase-2 step as pipeline/digits/pretrain.py runs it (InceptionV3 up to mixed7 + the 1×1 cell head, bfloat16 compute,
batch 16 of 299-px uint8 images, Adam) with every layer trained (the baseline: the default), with the stem
frozen (`mixed0`), and with everything below mixed3 frozen (`mixed3`): pretrain.freeze_below, as the stage does.
Each variant is traced and warmed first, then timed `--steps` steps at a time, the variants alternating, `--runs`
times; median and min–max seconds per step, and the ratio to the baseline.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


def variant(block: str, images):
    import keras
    import tensorflow as tf

    from pipeline.digits import pretrain

    keras.utils.set_random_seed(0)
    base, model = pretrain.build_classifier(299, "mixed7")
    pretrain.freeze_below(base, block)
    g = model.output_shape[1]
    labels = tf.constant(np.random.default_rng(1).integers(0, 11, (len(images), g, g)).astype(np.int32))
    optimizer = keras.optimizers.Adam(1e-3)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    for _ in range(2):
        float(step())
    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (16, 299, 299, 3)).astype(np.uint8))
    names = {"all": "all layers (the class default)", "mixed0": "scene_train_from = mixed0",
             "mixed3": "scene_train_from = mixed3"}
    steps = {block: variant(block, images) for block in names}
    times = {block: [] for block in names}
    for _ in range(args.runs):
        for block, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                float(step())
            times[block].append((time.perf_counter() - started) / args.steps)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}")
    base = statistics.median(times["all"])
    for block, label in names.items():
        t = times[block]
        print(f"{label:<28} {statistics.median(t):.2f} s/step (min {min(t):.2f}, max {max(t):.2f}), "
              f"{statistics.median(t) / base:.2f}x the default's time")


if __name__ == "__main__":
    main()
