"""The decoder's train step with and without XLA (`[training] jit_compile`) (not run by pytest).

    python tests/benchmarks/bench_xla.py [--runs 3]

The demo's decoder (configs/demo.cfg: 289 cells of 768 mixed7 channels + 12 cell scores, keys from the scores and
the context reading them too, location-sensitive attention 17 wide, the query reading the input word, 256 units,
128 attention, batch 32) trained by pipeline/train.py's make_train_step, plain and XLA-compiled, on the
same 11 batches of random features with caption lengths 8–18 (one XLA program per length). Prints the time to
trace (and compile) every length once, then captions/s over all 11 batches, the two alternating, `--runs` times:
median and min–max.
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

from bench_precision import BATCH, D, P, demo_batches, demo_decoder  # noqa: E402  (the demo's decoder, its batches)


def train_step(jit: bool):
    import keras
    import tensorflow as tf

    from pipeline.steps import make_optimizer, make_train_step
    from pipeline.train import DEFAULTS

    keras.utils.set_random_seed(0)
    settings = {**DEFAULTS, "attention_lambda": 0.0, "jit_compile": jit}
    model = demo_decoder()
    model(tf.zeros((1, P, D), tf.float16), tf.zeros((1, 1), tf.int32))
    optimizer = make_optimizer(settings, 100)
    optimizer.build(model.trainable_variables)
    return make_train_step(model, optimizer, tf.distribute.get_strategy(), settings)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import tensorflow as tf

    batches = demo_batches()
    steps, rates = {}, {False: [], True: []}
    for jit in (False, True):
        started = time.perf_counter()
        steps[jit] = train_step(jit)
        for batch in batches:
            float(steps[jit](*batch)[0])
        print(f"jit_compile = {str(jit).lower():<5}: first pass over {len(batches)} caption lengths "
              f"{time.perf_counter() - started:.1f} s")
    for _ in range(args.runs):
        for jit in (False, True):
            started = time.perf_counter()
            for batch in batches:
                float(steps[jit](*batch)[0])
            rates[jit].append(BATCH * len(batches) / (time.perf_counter() - started))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}")
    for jit, r in rates.items():
        print(f"jit_compile = {str(jit).lower():<5}: {statistics.median(r):.1f} captions/s "
              f"(min {min(r):.1f}, max {max(r):.1f})")
    print(f"XLA / plain {statistics.median(rates[True]) / statistics.median(rates[False]):.2f}x")


if __name__ == "__main__":
    main()
