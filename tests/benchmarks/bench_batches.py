"""The decoder's train step on three kinds of batch (`[training] bucket_width`, and the grouped batches of
self-critical training) (not run by pytest).

    python tests/benchmarks/bench_batches.py [--runs 3]

The demo's decoder (configs/demo.cfg: 289 cells of 768 mixed7 channels + 11 cell scores, keys from the scores,
256 units, 128 attention) trained by pipeline/train.py's make_train_step on random features. Caption lengths (in
tokens, <start> and <end> included) are drawn like the demo's: lognormal around 9.5, 5 to 17 (the demo's train
captions: mean 9.5, 5th–95th percentile 5–14, max 17). The same 1,920 captions (384 images × 5) are batched as
  pairs            32 pairs in random order, padded to the batch's longest: what bucket_width = 0
                   gives (the baseline is our own step, not a tutorial's: the TensorFlow
                   tutorial pads every caption to the dataset's longest, sgrvinod's to a fixed 52 and shrinks
                   the batch per time step);
  buckets of 3     32 pairs whose lengths fall in the same band of 3 tokens (bucket_width = 3);
  grouped 6 x 5    6 images with their 5 captions each, features projected once per image (what
                   self-critical training uses; self-critical.pytorch's seq_per_img).
Each variant is traced and warmed on all its batches first; then captions/s over all of them, the variants
alternating, `--runs` times: median and min–max.
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

from tests.benchmarks.bench_xla import D, P, V, train_step  # noqa: E402   the demo's decoder and its train step

IMAGES, PER_IMAGE, BATCH = 384, 5, 32


def padded(lengths, rng):
    out = np.zeros((len(lengths), max(lengths)), np.int32)
    for row, n in enumerate(lengths):
        out[row, :n] = rng.integers(1, V, n)
    return out


def make_batches(rng):
    import tensorflow as tf

    features = rng.standard_normal((IMAGES, P, D)).astype(np.float16)
    lengths = np.clip(np.round(rng.lognormal(np.log(9.2), 0.25, (IMAGES, PER_IMAGE))), 5, 17).astype(int)
    pairs = rng.permutation(IMAGES * PER_IMAGE)
    by_band = np.array(sorted(pairs, key=lambda k: lengths.flat[k] // 3))   # then cut into batches of 32
    out = {"pairs": [], "buckets of 3": [], "grouped 6 x 5": []}
    for name, order in (("pairs", pairs), ("buckets of 3", by_band)):
        for start in range(0, len(order), BATCH):
            chunk = order[start:start + BATCH]
            out[name].append((tf.constant(features[chunk // PER_IMAGE]),
                              tf.constant(padded([lengths.flat[k] for k in chunk], rng))))
    images = rng.permutation(IMAGES)
    for start in range(0, IMAGES, 6):
        chunk = images[start:start + 6]
        caps = padded(lengths[chunk].ravel(), rng).reshape(len(chunk), PER_IMAGE, -1)
        out["grouped 6 x 5"].append((tf.constant(features[chunk]), tf.constant(caps)))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import tensorflow as tf

    batches = make_batches(np.random.default_rng(0))
    steps, rates = {}, {name: [] for name in batches}
    for name in batches:
        steps[name] = train_step(jit=False)
        for batch in batches[name]:
            float(steps[name](*batch)[0])
    for _ in range(args.runs):
        for name in batches:
            started, captions = time.perf_counter(), 0
            for batch in batches[name]:
                captions += int(steps[name](*batch)[3])
            rates[name].append(captions / (time.perf_counter() - started))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}")
    base = statistics.median(rates["pairs"])
    for name, r in rates.items():
        print(f"{name:<14} {statistics.median(r):6.1f} captions/s (min {min(r):.1f}, max {max(r):.1f}), "
              f"{statistics.median(r) / base:.2f}x pairs")


if __name__ == "__main__":
    main()
