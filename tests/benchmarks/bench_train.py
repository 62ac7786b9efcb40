"""Training speed and memory (not run by pytest).

    python tests/benchmarks/bench_train.py [--runs 3]         # both parts
    python tests/benchmarks/bench_train.py --part speed | --part memory

speed:  captions/s of our compiled train step (pipeline/train.py: features projected once per sequence,
        batches padded to their own longest caption, one tf.while_loop over steps, LSTM with deep output and
        the doubly stochastic term) against the TensorFlow "Image captioning with visual attention" tutorial's
        train_step as it was written (tensorflow/docs, the Show-Attend-Tell version): CNN_Encoder (Dense + ReLU)
        applied once per batch; per time step only its BahdanauAttention (W1, W2, V), the GRU (called without
        an initial state, as the tutorial does) and fc1/fc2; captions padded to the dataset's max length; a
        Python loop inside the GradientTape of a @tf.function. Same sizes (512 projected features, 512 units,
        512 attention, 256 embedding, 10,000 words, batch 64), COCO-like caption lengths (mean ≈ 11, max 50).
        Both sides are traced and warmed on every batch shape first, then timed on the same batches,
        alternately, --runs times; median and min–max.
memory: a child process trains one epoch from a store of 4 shards, another from 40 shards (50 images, 5
        captions each per shard); each reports its peak RSS and its RSS once TensorFlow, the model and the
        optimizer are loaded: the growth above that runtime baseline shows that streaming keeps memory flat.
"""
import argparse
import os
import platform
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


def tutorial_models(vocab, embedding_dim=256, units=512, feature_dim=512):
    """The tutorial's CNN_Encoder, BahdanauAttention and RNN_Decoder, as written there (Keras 3 layers)."""
    import tensorflow as tf
    from tensorflow import keras

    class BahdanauAttention(keras.Model):
        def __init__(self, units):
            super().__init__()
            self.W1, self.W2, self.V = keras.layers.Dense(units), keras.layers.Dense(units), keras.layers.Dense(1)

        def call(self, features, hidden):
            hidden_with_time_axis = tf.expand_dims(hidden, 1)
            attention_hidden_layer = tf.nn.tanh(self.W1(features) + self.W2(hidden_with_time_axis))
            attention_weights = tf.nn.softmax(self.V(attention_hidden_layer), axis=1)
            return tf.reduce_sum(attention_weights * features, axis=1), attention_weights

    class CNN_Encoder(keras.Model):
        def __init__(self, embedding_dim):
            super().__init__()
            self.fc = keras.layers.Dense(embedding_dim)

        def call(self, x):
            return tf.nn.relu(self.fc(x))

    class RNN_Decoder(keras.Model):
        def __init__(self, embedding_dim, units, vocab_size):
            super().__init__()
            self.units = units
            self.embedding = keras.layers.Embedding(vocab_size, embedding_dim)
            self.gru = keras.layers.GRU(units, return_sequences=True, return_state=True,
                                        recurrent_initializer="glorot_uniform")
            self.fc1, self.fc2 = keras.layers.Dense(units), keras.layers.Dense(vocab_size)
            self.attention = BahdanauAttention(units)

        def call(self, x, features, hidden):
            context_vector, attention_weights = self.attention(features, hidden)
            x = tf.concat([tf.expand_dims(context_vector, 1), self.embedding(x)], axis=-1)
            output, state = self.gru(x)
            x = self.fc1(output)
            return self.fc2(tf.reshape(x, (-1, x.shape[2]))), state, attention_weights

        def reset_state(self, batch_size):
            return tf.zeros((batch_size, self.units))

    return CNN_Encoder(feature_dim), RNN_Decoder(embedding_dim, units, vocab)


def speed(batches_per_method=6, runs=3):
    import statistics

    import tensorflow as tf
    from tensorflow import keras

    from pipeline import steps, train as train_lib

    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    settings = {**train_lib.DEFAULTS, "feature_dim": 512, "attention_dim": 512, "embed_dim": 256, "units": 512}
    model = steps.build_model(VOCAB, settings)
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
    ours = steps.make_train_step(model, steps.make_optimizer(settings, 1), tf.distribute.get_strategy(),
                                     settings)

    encoder, decoder = tutorial_models(VOCAB)
    optimizer = keras.optimizers.Adam()
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def loss_function(real, pred):
        mask = tf.cast(tf.math.logical_not(tf.math.equal(real, 0)), tf.float32)
        return tf.reduce_mean(loss_object(real, pred) * mask)

    @tf.function
    def tutorial_step(img_tensor, target):
        loss = 0.0
        hidden = decoder.reset_state(batch_size=target.shape[0])
        dec_input = tf.expand_dims([1] * target.shape[0], 1)
        with tf.GradientTape() as tape:
            features = encoder(tf.cast(img_tensor, tf.float32))
            for i in range(1, target.shape[1]):
                predictions, hidden, _ = decoder(dec_input, features, hidden)
                loss += loss_function(target[:, i], predictions)
                dec_input = tf.expand_dims(target[:, i], 1)
        trainable_variables = encoder.trainable_variables + decoder.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, trainable_variables), trainable_variables))
        return loss

    def seconds(step, batches):
        start = time.perf_counter()
        for b in batches:
            step(features, b)
        return time.perf_counter() - start

    seconds(ours, ours_batches), seconds(tutorial_step, base_batches)   # trace every shape, warm both
    rates = {"ours": [], "tutorial": []}
    for _ in range(runs):
        rates["ours"].append(BATCH * len(ours_batches) / seconds(ours, ours_batches))
        rates["tutorial"].append(BATCH * len(base_batches) / seconds(tutorial_step, base_batches))
    ratios = [o / t for o, t in zip(rates["ours"], rates["tutorial"])]
    print(f"caption lengths: mean {lengths.mean():.1f}, max {lengths.max()}; mean batch-longest "
          f"{np.mean([b.shape[1] - 2 for b in ours_batches]):.1f}; {runs} alternating runs after a warm-up")
    for name, r in rates.items():
        print(f"{name:<9} {statistics.median(r):8.1f} captions/s (min {min(r):.1f}, max {max(r):.1f})")
    print(f"ours / tutorial {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")


def proc_status_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB, from /proc (Linux). Not getrusage's ru_maxrss: Linux
    keeps that high-water mark across fork + exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_child(shards_count: int):
    """Build a store of `shards_count` shards and train one epoch on it; print peak RSS in MiB."""
    import json

    from pipeline import steps, train as train_lib
    from pipeline.vocabulary import build_vocabulary
    from storage import manifests, shards

    tmp = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    rng = np.random.default_rng(0)
    index, records = {"images": {}}, []
    words = [f"w{i}" for i in range(50)]
    for k in range(shards_count):
        ids = list(range(k * 50, (k + 1) * 50))
        with shards.ShardWriter(tmp / "store" / f"shard-b-train-{k:05d}.h5", 64, 2048, {}) as w:
            w.append([str(i) for i in ids], ids, [f"{i}.jpg" for i in ids],
                     rng.random((50, 64, 2048), np.float32).astype(np.float16))
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
    import tensorflow as tf  # noqa: F401  (the loaded runtime: TensorFlow and a model like the one trained)
    loaded = steps.build_model(100, {**train_lib.DEFAULTS, **settings})
    loaded(tf.zeros((1, 64, 2048), tf.float16), tf.zeros((1, 1), tf.int32))
    runtime_mib = proc_status_mib("VmRSS")
    train_lib.train_decoder(tmp / "model", tmp / "ckpt", tmp / "store", index, val_index, ann, tmp / "vocab.json",
                            settings)
    print(json.dumps({"shards": shards_count, "runtime_mib": runtime_mib,
                      "peak_rss_mib": proc_status_mib("VmHWM")}))


def memory():
    import json
    growth = {}
    for count in (4, 40):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(count)], capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        growth[count] = r["peak_rss_mib"] - r["runtime_mib"]
        print(f"{count:3d} shards ({count * 50} images, {count * 250} pairs): loaded runtime {r['runtime_mib']:.0f} MiB, "
              f"peak {r['peak_rss_mib']:.0f} MiB: training grew it by {growth[count]:.0f} MiB")
    print(f"10x the shards: {growth[40] - growth[4]:+.0f} MiB of growth")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["speed", "memory", "both"], default="both")
    parser.add_argument("--memory-child", type=int)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    import tensorflow as tf
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}")
    if args.part in ("speed", "both"):
        speed(runs=args.runs)
    if args.part in ("memory", "both"):
        memory()


if __name__ == "__main__":
    main()
