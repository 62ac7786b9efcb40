"""Feature extraction speed and size, side by side in one process on demo images (not run by pytest).

    python tests/benchmarks/bench_extraction.py [--images 96] [--batch 16] [--precision bfloat16]

Prints images/s of
  bare      a float32 InceptionV3 forward on pre-made uint8 tensors (no decoding, no writing): the float32
            ceiling;
  ours      pipeline.features.extract_shard at [encoder] precision = --precision: threaded decode + resize,
            compiled forward, float16 HDF5 shard;
  tutorial  the TensorFlow captioning tutorial's way: tf.data map(read, decode, resize) + batch, forward,
            one float32 .npy file per image;
and the ratios ours/bare and ours/tutorial, plus bytes per image on disk of each format, and how close ours'
features are to float32's (cosine per image, relative error).
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from pipeline import encoder as encoder_lib, features  # noqa: E402
from pipeline.digits.demo import write_demo_dataset  # noqa: E402
from pipeline.images import load_image  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", default="bfloat16", choices=list(encoder_lib.PRECISIONS))
    args = parser.parse_args()
    import tensorflow as tf

    tmp = Path(tempfile.mkdtemp(prefix="bench-extraction-"))
    write_demo_dataset(tmp / "demo", args.images, 1, 1, seed=11)
    paths = sorted(str(p) for p in (tmp / "demo" / "train").glob("*.jpg"))[:args.images]
    identity = encoder_lib.resolve_weights("random:0")
    forward = features.encoder_forward(identity, 299)
    batches = [np.stack([load_image(p, 299) for p in paths[i:i + args.batch]]) for i in range(0, len(paths), args.batch)]
    items = [[str(i), i, str(Path(p).parent), Path(p).name] for i, p in enumerate(paths)]
    shards_made = []

    def ours():
        shard = tmp / "store" / f"shard-bench-train-{len(shards_made):05d}.h5"   # a new shard every run
        shards_made.append(shard)
        assert features.extract_shard(shard, items, identity, 299, args.batch, {},
                                      precision=args.precision)["rows"] == len(paths)

    model = encoder_lib.build_inception(identity, 299)          # the tutorial's image_features_extract_model

    def load_tf(path):
        img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        img = tf.image.resize(img, (299, 299))
        return tf.keras.applications.inception_v3.preprocess_input(img), path

    def tutorial():
        ds = tf.data.Dataset.from_tensor_slices(paths).map(load_tf, num_parallel_calls=tf.data.AUTOTUNE)
        for img, path in ds.batch(args.batch):
            feats = model(img, training=False)
            feats = tf.reshape(feats, (feats.shape[0], -1, feats.shape[3]))
            for f, p in zip(feats, path):
                np.save(str(tmp / "npy" / Path(p.numpy().decode()).name) + ".npy", f.numpy())

    (tmp / "npy").mkdir()
    sides = {"bare": lambda: [forward(b).numpy() for b in batches], "ours": ours, "tutorial": tutorial}
    for fn in sides.values():                                   # build, trace and warm every side alike
        fn()
    seconds = {name: [] for name in sides}
    for _ in range(args.runs):                                  # alternating runs
        for name, fn in sides.items():
            seconds[name].append(timed(fn)[0])
    shard = shards_made[-1]
    npy_bytes = sum(f.stat().st_size for f in (tmp / "npy").glob("*.npy")) / len(paths)
    shard_bytes = shard.stat().st_size / len(paths)

    n = len(paths)
    rate = {name: [n / t for t in ts] for name, ts in seconds.items()}
    ratio = lambda a, b: [x / y for x, y in zip(rate[a], rate[b])]
    show = lambda values, fmt: f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}; "
          f"{n} demo images, batch {args.batch}, 299x299, random:0 weights; {args.runs} alternating runs after a "
          "warm-up (median, min–max)")
    print(f"bare forward      {show(rate['bare'], '{:.2f}')} images/s")
    print(f"ours (full task)  {show(rate['ours'], '{:.2f}')} images/s   = {show(ratio('ours', 'bare'), '{:.0%}')} of bare")
    print(f"tutorial baseline {show(rate['tutorial'], '{:.2f}')} images/s   ours/tutorial = "
          f"{show(ratio('ours', 'tutorial'), '{:.2f}')}x")
    print(f"bytes per image: ours {shard_bytes / 1024:.1f} KiB (float16 HDF5), tutorial {npy_bytes / 1024:.1f} KiB "
          f"(float32 .npy)  ratio {npy_bytes / shard_bytes:.2f}x")
    from storage import shards
    want = np.concatenate([forward(b).numpy() for b in batches]).astype(np.float32).reshape(n, -1)
    got = shards.read_rows(shard, 0, n).astype(np.float32).reshape(n, -1)
    cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    error = np.abs(got - want).sum(1) / np.abs(want).sum(1)
    print(f"ours ({args.precision}) against float32 features: cosine per image min {cosine.min():.6f}, mean "
          f"{cosine.mean():.6f}; mean relative error {error.mean():.2%}")


if __name__ == "__main__":
    main()
