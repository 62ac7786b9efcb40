"""Caption decoding speed on the same features, side by side in one process (not run by pytest).

    python tests/benchmarks/bench_decode.py [--images 256] [--batch 64] [--runs 3]

Compares captions/s of
  loop      the TensorFlow tutorial's `evaluate`: one image at a time, a Python loop over steps, eager calls
            and a host round trip (argmax on numpy) per word;
  greedy    pipeline.decode.greedy_fn: the whole batch in one compiled tf.while_loop;
  beam-3    pipeline.decode.beam_fn with beam size 3, same batches.
Model: the COCO-size decoder (512 units, 512 attention, 256 embedding, 10,000 words), random weights; each
caption runs the full max_length steps in every method (random weights never emit <end> reliably), so the
comparison is per step of work.
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
import tensorflow as tf  # noqa: E402

from pipeline.decode import beam_fn, greedy_fn  # noqa: E402
from pipeline.model import ShowAttendTell  # noqa: E402

VOCAB, MAX_LEN, END = 10000, 20, 2


def tutorial_loop(model, features):
    """Per image, per step, eager — the shape of the tutorial's evaluate()."""
    out = []
    for f in features:
        a, keys, state = model.encode(f[None])
        word, words = tf.constant([1]), []
        for _ in range(MAX_LEN):
            emb = model.embed(word)
            h, z, _, state = model.step(emb, a, keys, state)
            predicted = int(np.argmax(model.output_logits(emb, h, z).numpy()[0]))
            words.append(predicted)
            if predicted == END:
                break
            word = tf.constant([predicted])
        out.append(words)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--loop-images", type=int, default=16, help="the loop is slow: time it on fewer")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tf.keras.utils.set_random_seed(0)
    model = ShowAttendTell(VOCAB, feature_dim=512, attention_dim=512, embed_dim=256, units=512, dropout=0.0)
    features = tf.cast(tf.random.stateless_uniform((args.images, 64, 2048), seed=(1, 2), maxval=2.0), tf.float16)
    model(features[:1], tf.zeros((1, 1), tf.int32))
    # Never stop early: the same number of steps for every method (an <end> id nothing is drawn towards).
    model.logits.bias.assign(model.logits.bias.numpy() + np.eye(VOCAB, dtype=np.float32)[END] * -1e4)
    batches = [features[i:i + args.batch] for i in range(0, args.images, args.batch)]

    def seconds(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    greedy = greedy_fn(model, MAX_LEN, 1, END)
    beam = beam_fn(model, 3, MAX_LEN, 1, END)
    methods = {"loop": (lambda: tutorial_loop(model, features[:args.loop_images]), args.loop_images),
               "greedy": (lambda: [greedy(b)[0].numpy() for b in batches], args.images),
               "beam 3": (lambda: [beam(b)[0].numpy() for b in batches], args.images)}
    for fn, _ in methods.values():                        # trace / warm up every method alike
        fn()
    rates = {name: [] for name in methods}
    for _ in range(args.runs):                            # alternating runs
        for name, (fn, n) in methods.items():
            rates[name].append(n / seconds(fn))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}; "
          f"decoder 512/512/256, vocab {VOCAB}, {MAX_LEN} steps, batch {args.batch}; {args.runs} alternating runs "
          "after a warm-up (median, min–max)")
    for name, r in rates.items():
        ratios = [x / y for x, y in zip(r, rates["loop"])]
        print(f"{name:<7} {statistics.median(r):8.1f} captions/s ({min(r):.1f}–{max(r):.1f})   "
              f"{statistics.median(ratios):6.1f}x the loop ({min(ratios):.1f}–{max(ratios):.1f})")

if __name__ == "__main__":
    main()
