"""The attention read as the model computes it against its usual form, side by side in one process (not run by
pytest).

    python tests/benchmarks/bench_location.py [--runs 3]

The demo's decoder (configs/demo.cfg, as in bench_precision.py: 289 cells, keys from the cell scores, positions,
location-sensitive attention 17 wide, batch 32, captions of 8–18 words) trained by pipeline/steps.py's train
step, at float32 and mixed_bfloat16, in two forms with the same weights: `matrix`, the model as it is
(pipeline/model.py: [α, Σ α] · location_matrix, laid out once per batch; the context as a batched matrix
product), and `conv`, the same model whose attention calls its Keras Conv2D on the 17×17 grid at every step
(the usual Tacotron 2 / Chorowski form) and reads the context with einsum, as this model did before. Both are
traced and warmed over every length first; then captions/s over all 11 batches, the four sides alternating,
`--runs` times: median and min–max, and each side's ratio to float32 `conv`.
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


from bench_precision import BATCH, demo_batches, train_step  # noqa: E402  (the same decoder, step, batches)


def conv_attend(model):
    """`model.attend` replaced by the usual form: the grid of [α, Σ α] through location_conv every step, the
    context by einsum."""
    import tensorflow as tf

    from pipeline.model import LOCATION_FILTERS

    def attend(a, keys, h, where=None, location_matrix=None):
        scores = keys + model.query(h)[:, None, :]
        shape = tf.shape(a)
        side = tf.cast(tf.round(tf.sqrt(tf.cast(shape[1], tf.float32))), tf.int32)
        grid = tf.reshape(tf.stack(where, -1), [shape[0], side, side, 2])
        found = model.location_conv(tf.cast(grid, scores.dtype))
        scores += model.location_dense(tf.reshape(found, [shape[0], shape[1], LOCATION_FILTERS]))
        e = tf.squeeze(model.score(tf.tanh(scores)), -1)
        alpha = tf.nn.softmax(tf.cast(e, tf.float32), axis=-1)
        z = tf.einsum("bp,bpf->bf", tf.cast(alpha, a.dtype), a)
        return model.gate(h) * z, alpha
    model.attend = attend


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import tensorflow as tf

    batches = demo_batches()
    sides = [(precision, form) for precision in ("float32", "mixed_bfloat16") for form in ("conv", "matrix")]
    steps, rates = {}, {side: [] for side in sides}
    for precision, form in sides:
        steps[(precision, form)] = train_step(precision, conv_attend if form == "conv" else None)
    # same weights, same numbers: the first float32 step of each form from the same initial weights
    first = {form: float(steps[("float32", form)](*batches[0])[0]) for form in ("conv", "matrix")}
    for side in sides:
        for batch in batches + batches:                        # trace every caption length, then warm once more
            float(steps[side](*batch)[0])
    for _ in range(args.runs):
        for side in sides:
            started = time.perf_counter()
            for batch in batches:
                float(steps[side](*batch)[0])
            rates[side].append(BATCH * len(batches) / (time.perf_counter() - started))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}; "
          f"{args.runs} alternating runs after a warm-up (median, min–max); first float32 loss: conv "
          f"{first['conv']:.6f}, matrix {first['matrix']:.6f}")
    base = statistics.median(rates[sides[0]])
    for (precision, form), r in rates.items():
        print(f"{precision:<15} {form:<7} {statistics.median(r):7.1f} captions/s (min {min(r):.1f}, max "
              f"{max(r):.1f})   {statistics.median(r) / base:.2f}x float32 conv")


if __name__ == "__main__":
    main()
