"""The decoder's input pipeline from HDF5 feature shards (read through storage/shards.py).

Memory is O(block + shuffle buffer + batch), never O(dataset):
  split index → shard_rows {shard path: [(row, image_id)]} → blocks: contiguous row ranges of at most
  `block_rows` rows, each one read (never a long fancy-index list).
  Training (pairs_dataset): epoch e, seed s → epoch_plan: shards permuted by rng(s, e), rows permuted within a
  block, each image paired with each of its captions; a seeded shuffle buffer mixes pairs across images;
  batches padded to their own longest caption (optionally of similar lengths; or of whole images with all their
  captions). The order is a pure function of (seed, epoch), so a resumed epoch skips exactly the batches it had
  already trained on.
  Decoding and statistics (feature_batches, feature_statistics): every image once, in store order.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.vocabulary import Vocabulary
from storage import shards


def shard_rows(store_dir, index: dict) -> dict[str, list[tuple[int, int]]]:
    """Split index {image_id: [shard, row]} → {shard path: [(row, image_id), ...] sorted by row}."""
    by_shard = defaultdict(list)
    for image_id, (shard, row) in index["images"].items():
        by_shard[str(Path(store_dir) / f"{shard}.h5")].append((int(row), int(image_id)))
    return {path: sorted(rows) for path, rows in sorted(by_shard.items())}


def blocks(rows: list[tuple[int, int]], block_rows: int):
    """Contiguous row ranges covering `rows` (sorted): [(start, stop, [(row, image_id), ...]), ...]."""
    out, current = [], []
    for row, image_id in rows:
        if current and row - current[0][0] >= block_rows:
            out.append((current[0][0], current[-1][0] + 1, current))
            current = []
        current.append((row, image_id))
    if current:
        out.append((current[0][0], current[-1][0] + 1, current))
    return out


def iterate_images(by_shard: dict, block_rows: int):
    """Yield (image_id, features (P, D) float16) for every indexed image once, in store order."""
    for path, rows in by_shard.items():
        for start, stop, members in blocks(rows, block_rows):
            block = shards.read_rows(path, start, stop)           # one contiguous read
            for row, image_id in members:
                yield image_id, block[row - start]


def caption_ids(records, vocab: Vocabulary) -> dict[int, list[np.ndarray]]:
    """{image_id: [ids of each caption]} for manifest records, after the vocabulary's length policy."""
    out = {}
    for r in records:
        encoded = [vocab.encode(c) for c in r["captions"]]
        out[r["image_id"]] = [np.asarray(ids, np.int32) for ids in encoded if ids is not None]
    return out


def count_pairs(by_shard, captions) -> tuple[int, int]:
    """(pairs, images with at least one caption) of a split."""
    counts = [len(captions.get(image_id, ())) for rows in by_shard.values() for _, image_id in rows]
    return sum(counts), sum(1 for n in counts if n)


def pairs_dataset(by_shard, captions, batch_size: int, seed: int, epoch: int, shuffle_buffer: int,
                  block_rows: int, positions: int, channels: int, group: bool = False, bucket_width: int = 0):
    """tf.data of padded batches (image_ids (B,), features (B, P, D) float16, captions (B, T) int32). (Over 50
    lines: one tf.data graph, its reading, bucketing and padding, read top to bottom.)

    bucket_width > 0 (pairs only): after the shuffle buffer, each pair waits in the bucket of its caption length
    (bands of bucket_width tokens: length_boundaries) until `batch_size` pairs fill it, so a batch pads its
    captions to a similar length; without it, a demo batch of 32 pads to ~16 tokens for a mean of ~9.5, and the
    recurrent loop runs ~40% of its steps on padding. Each bucket's last batch may be partial (batches_per_epoch).

    group = True: each element is a whole image with all its captions, and a batch holds `batch_size` images:
    captions (B, C, T), C the batch's most captions per image (the missing ones all padding), so the decoder
    projects an image's features once for all its captions (self-critical.pytorch's seq_per_img).

    The epoch's reading plan (epoch_plan) is fixed in numpy first; tf.data then reads one block per element
    with tf.numpy_function and expands it into (image, caption) pairs, or (image, its captions) groups.

    tf.data's autotuning is off: its model thread sleeps 10 ms, 20 ms, … 40.96 s between optimisations, and
    deleting the iterator (every epoch's end) waited for that sleep to end, so every epoch lasted until the
    next of 0.01·(2^k − 1) s since it began: 40.96 s or 81.91 s instead of 25–45 s on the demo (py-spy
    showed the wait in RootDataset::Iterator's destructor; TF 2.21). The buffers are sized explicitly."""
    import tensorflow as tf

    plan = epoch_plan(by_shard, captions, seed, epoch, block_rows)

    def load(b):
        path, start, stop, pairs = plan[int(b)]
        block = shards.read_rows(path, start, stop)               # one contiguous read
        runs = []   # the elements: one pair each, or (group) each image's captions, which epoch_plan lists together
        for pair in pairs:
            if group and runs and runs[-1][0][1] == pair[1]:
                runs[-1].append(pair)
            else:
                runs.append([pair])
        caps = [[captions[image_id][k] for _, image_id, k in run] for run in runs]
        lengths = np.array([max(len(c) for c in group_caps) for group_caps in caps], np.int32)
        padded = np.zeros((len(caps), max(len(g) for g in caps), int(lengths.max(initial=0))), np.int32)
        for i, group_caps in enumerate(caps):
            for j, c in enumerate(group_caps):
                padded[i, j, :len(c)] = c
        return (np.array([run[0][1] for run in runs], np.int64), block,
                np.array([run[0][0] for run in runs], np.int32), padded,
                np.array([len(g) for g in caps], np.int32), lengths)

    def read(b):
        ids, block, offsets, caps, counts, lengths = tf.numpy_function(
            load, [b], (tf.int64, tf.float16, tf.int32, tf.int32, tf.int32, tf.int32), stateful=False)
        block.set_shape((None, positions, channels))
        caps.set_shape((None, None, None))
        for vector in (ids, offsets, counts, lengths):
            vector.set_shape((None,))
        elements = tf.data.Dataset.from_tensor_slices((ids, offsets, caps, counts, lengths))
        if group:
            return elements.map(lambda i, o, c, k, n: (i, tf.gather(block, o), c[:k, :n]))
        return elements.map(lambda i, o, c, k, n: (i, tf.gather(block, o), c[0, :n]))

    ds = tf.data.Dataset.range(len(plan)).flat_map(read)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed * 100003 + epoch, reshuffle_each_iteration=False)
    options = tf.data.Options()
    options.autotune.enabled = False
    caption_shape = (None, None) if group else (None,)
    if bucket_width and not group:
        boundaries = length_boundaries(captions, bucket_width)
        ds = ds.bucket_by_sequence_length(lambda i, f, c: tf.shape(c)[0], boundaries,
                                          [batch_size] * (len(boundaries) + 1))
    else:
        ds = ds.padded_batch(batch_size, padded_shapes=((), (positions, channels), caption_shape))
    return ds.prefetch(2).with_options(options)


def length_boundaries(captions, width: int) -> list[int]:
    """Bucket boundaries every `width` tokens up to the longest caption of `captions` ({image_id: [ids]})."""
    longest = max((len(c) for caps in captions.values() for c in caps), default=1)
    return list(range(width, longest + 1, width))


def batches_per_epoch(by_shard, captions, batch_size: int, bucket_width: int = 0) -> int:
    """How many batches pairs_dataset yields per epoch of (image, caption) pairs: with buckets, each bucket's
    pairs in full batches plus its partial last one."""
    lengths = [len(c) for rows in by_shard.values() for _, image_id in rows for c in captions.get(image_id, ())]
    if not bucket_width:
        return -(-len(lengths) // batch_size)
    per_bucket = np.bincount(np.searchsorted(length_boundaries(captions, bucket_width), lengths, side="right"))
    return int(sum(-(-n // batch_size) for n in per_bucket))


def epoch_plan(by_shard, captions, seed: int, epoch: int, block_rows: int) -> list[tuple]:
    """The order an epoch reads its pairs in, a pure function of (seed, epoch): shards permuted, each read in
    contiguous blocks, images permuted within a block, each image's captions permuted.
    → [(shard path, start row, stop row, [(row - start, image_id, caption index), ...]), ...]."""
    rng = np.random.default_rng([seed, epoch])
    shards = list(by_shard)
    plan = []
    for s in rng.permutation(len(shards)):
        for start, stop, members in blocks(by_shard[shards[s]], block_rows):
            pairs = []
            for i in rng.permutation(len(members)):
                row, image_id = members[i]
                pairs += [(row - start, image_id, int(k)) for k in rng.permutation(len(captions.get(image_id, ())))]
            if pairs:
                plan.append((shards[s], start, stop, pairs))
    return plan


def feature_batches(by_shard, batch_size: int, block_rows: int):
    """(image_ids (k,), features (k, P, D) float16) batches of every indexed image, in store order."""
    ids, feats = [], []
    for image_id, features in iterate_images(by_shard, block_rows):
        ids.append(image_id)
        feats.append(features)
        if len(ids) == batch_size:
            yield np.asarray(ids), np.stack(feats)
            ids, feats = [], []
    if ids:
        yield np.asarray(ids), np.stack(feats)


def feature_statistics(by_shard, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (D,) over every position of every indexed image: one
    streaming pass of contiguous block reads."""
    moments = shards.Moments()
    for path, rows in by_shard.items():
        for start, stop, members in blocks(rows, block_rows):
            block = shards.read_rows(path, start, stop)[[row - start for row, _ in members]]
            moments.add(block.reshape(-1, block.shape[-1]))
    return moments.mean().astype(np.float32), np.maximum(moments.std(), 1e-3).astype(np.float32)
