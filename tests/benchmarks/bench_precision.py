"""The decoder's train step at each `[training] precision`, side by side in one process (not run by pytest).

    python tests/benchmarks/bench_precision.py [--runs 3] [--precisions float32 mixed_bfloat16 mixed_float16]
                                               [--decoder demo|coco]

The demo's decoder (configs/demo.cfg: 289 cells of 768 mixed7 channels + 11 cell scores, keys from the scores,
positions, the context reading the scores, location-sensitive attention 17 wide, 256 units, 128 attention,
batch 32), or with `--decoder coco` configs/luigi.cfg's (the paper's: 64 mixed10 cells of 2048 channels, 512
units, 512 attention, 512 embedding, 10,000 words, the doubly stochastic term, batch 64), trained by
pipeline/train.py's make_optimizer and make_train_step, built under each precision's Keras
dtype policy as train_decoder builds it, on the same 11 batches of random features with caption lengths 8–18.
Every side is traced and warmed over all lengths first; then captions/s over all 11 batches, the sides
alternating, `--runs` times: median and min–max, and each precision's ratio to float32.
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

from pipeline.digits.cell_scores import CHANNELS as SCORES  # noqa: E402  (the demo's extra channels per cell)

P, D, V, BATCH = 289, 768 + SCORES, 60, 32   # the demo's: mixed7+cell_scores, its vocabulary, its batches
SIZES = {"demo": (P, D, V, BATCH), "coco": (64, 2048, 10_000, 64)}   # positions, channels, words, batch


def demo_decoder():
    """The demo's decoder (configs/demo.cfg's [decoder]) at the demo's sizes, not yet built."""
    from pipeline.model import ShowAttendTell

    return ShowAttendTell(V, feature_channels=D, key_channels=SCORES, positions=True, context_extras=True,
                          location=17, query_word=True, attention_dim=128, feature_dim=256, embed_dim=128,
                          units=256, dropout=0.3)


def train_step(precision: str, prepare=None, decoder: str = "demo"):
    """The demo decoder's (or `decoder` "coco": configs/luigi.cfg's) compiled train step under `precision`;
    `prepare(model)` runs before the model is built (bench_location.py swaps its attention there)."""
    import keras
    import tensorflow as tf

    from pipeline.model import ShowAttendTell
    from pipeline.steps import make_optimizer, make_train_step
    from pipeline.train import DEFAULTS

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)   # as train_decoder does, for the model it builds
    try:
        positions, channels, words, _ = SIZES[decoder]
        if decoder == "coco":
            settings = {**DEFAULTS, "precision": precision}
            model = ShowAttendTell(words, feature_channels=channels,
                                   **{k: DEFAULTS[k] for k in ("feature_dim", "attention_dim", "embed_dim", "units",
                                                               "dropout", "cell")})
        else:
            settings = {**DEFAULTS, "attention_lambda": 0.0, "precision": precision}
            model = demo_decoder()
        if prepare is not None:
            prepare(model)
        model(tf.zeros((1, positions, channels), tf.float16), tf.zeros((1, 1), tf.int32))
        optimizer = make_optimizer(settings, 100)
        optimizer.build(model.trainable_variables)
        return make_train_step(model, optimizer, tf.distribute.get_strategy(), settings)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def demo_batches(decoder: str = "demo"):
    """The same 11 batches of random features for every side: BATCH captions of 8–18 words each (COCO's sizes
    for `decoder` "coco")."""
    import tensorflow as tf

    p, d, v, batch = SIZES[decoder]
    rng = np.random.default_rng(0)
    return [(tf.constant(rng.standard_normal((batch, p, d)).astype(np.float16)),
             tf.constant(rng.integers(1, v, (batch, length)).astype(np.int32))) for length in range(8, 19)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--decoder", choices=["demo", "coco"], default="demo")
    args = parser.parse_args()
    import tensorflow as tf

    batches = demo_batches(args.decoder)
    captions_per_batch = batches[0][0].shape[0]
    steps, rates = {}, {p: [] for p in args.precisions}
    for precision in args.precisions:
        steps[precision] = train_step(precision, decoder=args.decoder)
        for batch in batches:                                  # trace every caption length, then warm once more
            float(steps[precision](*batch)[0])
        for batch in batches:
            float(steps[precision](*batch)[0])
    for _ in range(args.runs):
        for precision in args.precisions:
            started = time.perf_counter()
            for batch in batches:
                float(steps[precision](*batch)[0])
            rates[precision].append(captions_per_batch * len(batches) / (time.perf_counter() - started))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}; "
          f"the {args.decoder} decoder; {args.runs} alternating runs after a warm-up (median, min–max)")
    base = statistics.median(rates[args.precisions[0]])
    for precision, r in rates.items():
        print(f"{precision:<15} {statistics.median(r):7.1f} captions/s (min {min(r):.1f}, max {max(r):.1f})   "
              f"{statistics.median(r) / base:.2f}x {args.precisions[0]}")


if __name__ == "__main__":
    main()
