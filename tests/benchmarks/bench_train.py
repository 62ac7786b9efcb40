"""Training speed and memory (not run by pytest).

    python tests/benchmarks/bench_train.py            # both parts
    python tests/benchmarks/bench_train.py --part speed | --part memory

speed:  captions/s of our compiled train step (features projected once per sequence, batches padded to their
        own longest caption, tf.while_loop over steps) vs a TensorFlow-tutorial-style step (a Python loop over
        time steps inside the tape, attention keys recomputed from the features at every step, captions padded
        to the global maximum length), same layers and sizes (512 units, 512 attention, 256 embedding, 512
        projected features, 10,000 words, batch 64), COCO-like caption lengths (mean ≈ 11, max 50).
memory: peak RSS of a child process that trains one epoch from a store of 4 shards vs 40 shards
        (50 images, 5 captions each per shard): streaming keeps it flat.
"""
import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

VOCAB, BATCH, MAX_LEN = 10000, 64, 50


def caption_lengths(n, rng):
    """Word counts like COCO's: mean ≈ 11, long tail, at most MAX_LEN (which occurs)."""
    lengths = np.clip(np.round(rng.lognormal(np.log(10.3), 0.28, n)), 5, MAX_LEN).astype(int)
    lengths[rng.integers(n)] = MAX_LEN
    return lengths


def speed(batches_per_method=6):
    import tensorflow as tf

    from pipeline import train as train_lib
    from pipeline.model import ShowAttendTell, caption_loss

    rng = np.random.default_rng(0)
    tf.keras.utils.set_random_seed(0)
    settings = {**train_lib.DEFAULTS, "feature_dim": 512, "attention_dim": 512, "embed_dim": 256, "units": 512}
    model = train_lib.build_model(VOCAB, settings)
    features = tf.cast(tf.random.stateless_uniform((BATCH, 64, 2048), seed=(1, 2), maxval=2.0), tf.float16)
    model(features[:1], tf.zeros((1, 1), tf.int32))
    lengths = caption_lengths(BATCH * batches_per_method, rng)

    def captions(batch_lengths, width):
        out = np.zeros((len(batch_lengths), width + 2), np.int32)
        for row, n in enumerate(batch_lengths):
            out[row, :n + 2] = [1, *rng.integers(4, VOCAB, n), 2]
        return tf.constant(out)

    ours_batches = [captions(lengths[i:i + BATCH], lengths[i:i + BATCH].max()) for i in range(0, len(lengths), BATCH)]
    base_batches = [captions(lengths[i:i + BATCH], MAX_LEN) for i in range(0, len(lengths), BATCH)]
    optimizer = train_lib.make_optimizer(settings, 1)
    ours = train_lib.make_train_step(model, optimizer, tf.distribute.get_strategy(), settings)

    @tf.function
    def tutorial_step(features, target):
        loss = 0.0
        with tf.GradientTape() as tape:
            state = model.encode(features)[2]
            for i in range(1, target.shape[1]):                     # Python loop, padded to the global max
                a = model.project(tf.cast(features, tf.float32))     # recomputed every step, like the tutorial
                keys = model.keys(a)
                emb = model.embed(target[:, i - 1])
                h, z, alpha, state = model.step(emb, a, keys, state, training=True)
                logits = model.output_logits(emb, h, z, training=True)
                step_loss, _, _ = caption_loss(logits[:, None], alpha[:, None], target[:, i:i + 1], 0.0)
                loss += step_loss
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    def rate(step, batches):
        step(features, batches[0])                                     # trace
        start = time.perf_counter()
        for b in batches:
            step(features, b)
        return BATCH * len(batches) / (time.perf_counter() - start)

    ours_rate, base_rate = rate(ours, ours_batches), rate(tutorial_step, base_batches)
    print(f"caption lengths: mean {lengths.mean():.1f}, max {lengths.max()}; mean batch-longest "
          f"{np.mean([b.shape[1] - 2 for b in ours_batches]):.1f}")
    print(f"ours             {ours_rate:8.1f} captions/s")
    print(f"tutorial-style   {base_rate:8.1f} captions/s   ours = {ours_rate / base_rate:.1f}x")


def memory_child(shards_count: int):
    """Build a store of `shards_count` shards and train one epoch on it; print peak RSS in MiB."""
    import json

    from pipeline import train as train_lib
    from pipeline.vocabulary import build_vocabulary
    from storage import manifests, shards

    tmp = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    rng = np.random.default_rng(0)
    index, records = {"images": {}}, []
    words = [f"w{i}" for i in range(50)]
    for k in range(shards_count):
        ids = list(range(k * 50, (k + 1) * 50))
        with shards.ShardWriter(tmp / "store" / f"shard-b-train-{k:05d}.h5", 64, 2048, {}) as w:
            w.append(ids, [f"{i}.jpg" for i in ids], rng.random((50, 64, 2048), np.float32).astype(np.float16))
        for row, i in enumerate(ids):
            index["images"][str(i)] = [f"shard-b-train-{k:05d}", row]
            caps = [" ".join(rng.choice(words, int(n))) for n in caption_lengths(5, rng)]
            records.append({"image_id": i, "root": "/", "path": f"{i}.jpg", "captions": caps, "raw_captions": caps})
    ann = tmp / "annotations"
    manifests.write_manifest(ann / "train.jsonl", records)
    manifests.write_manifest(ann / "val.jsonl", records[:50])
    manifests.write_json(tmp / "vocab.json", build_vocabulary(records, 1, max_length=MAX_LEN))
    val_index = {"images": {k: v for k, v in list(index["images"].items())[:50]}}
    settings = {"feature_dim": 64, "attention_dim": 64, "embed_dim": 32, "units": 64, "epochs": 1, "batch_size": 64,
                "checkpoint_every": 10**9, "shuffle_buffer": 1000}
    (tmp / "model").mkdir()
    train_lib.train_decoder(tmp / "model", tmp / "ckpt", tmp / "store", index, val_index, ann, tmp / "vocab.json",
                            settings)
    print(json.dumps({"shards": shards_count, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory():
    import json
    results = {}
    for count in (4, 40):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(count)], capture_output=True, text=True)
        results[count] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        print(f"{count:3d} shards ({count * 50} images, {count * 250} pairs): peak RSS {results[count]:.0f} MiB")
    print(f"10x the shards: {results[40] / results[4]:.2f}x the peak RSS")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["speed", "memory", "both"], default="both")
    parser.add_argument("--memory-child", type=int)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    import tensorflow as tf
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}")
    if args.part in ("speed", "both"):
        speed()
    if args.part in ("memory", "both"):
        memory()


if __name__ == "__main__":
    main()
