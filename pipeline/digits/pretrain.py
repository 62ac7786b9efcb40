"""Pretraining InceptionV3 on handwritten digits: the offline stand-in for ImageNet weights (`weights = digits`).

No ImageNet weights can be downloaded offline, and random InceptionV3 weights map every image to nearly the same
features. This module trains `keras.applications.InceptionV3(include_top=False)` from scratch on scikit-learn's
handwritten digits (the demo's TRAIN pool only, so val/test digits stay unseen) and saves the base network's
weights, which the encoder then loads like any weights file.

Data and targets: pipeline/digits/scenes.py.

Two phases, then one fix-up:
1. Crops (`steps` × `batch_size`): square windows around one digit (or anywhere) resized to C×C (C = `crop`,
   75 px, InceptionV3's minimum and cheapest input: one mixed10 cell, 3×3 mixed7 cells). Teaches the glyphs
   fast: ~120 crops/s on 2 cores.
2. Whole scenes (`scene_steps` × `scene_batch_size`) of `scene_train_size` px (configs/luigi.cfg: 224, cheaper
   steps than at the encoder's 299 and smaller digits; 0: the encoder's size), every one of the cells of
   `layer` labelled (a digit too small to contain a cell centre labels its nearest cell; background cells weigh
   BACKGROUND_WEIGHT). Teaches the scale, the layout and the neighbours of the real input: ~6 299-px scenes/s,
   or ~12 with `scene_train_from = mixed3` (only that block and those above it trained: freeze_below).
   With `position_weight` > 0 the head has two more outputs trained in this phase: each cell's row and column (−1
   to 1 over the grid; the squared distance per cell, that weight against the cells' cross-entropy), so the
   features say where they lie. Convolutional features say it only faintly (a linear probe places 0.18–0.28 of the
   mixed10 cells exactly), and the paper's decoder, whose attention sees nothing else, finds digits but not which
   comes first (docs/results.md, "The plain path"). Those two outputs are not saved: the cell head stays 12 wide.
3. Every batch norm's statistics (those phase 2 trained) are re-estimated on `bn_scenes` whole 299-px train-pool
   scenes (recalibrate_batchnorm), in float32, where the encoder is used.

Measured (docs/results.md): a linear probe of the mixed10 cell under each val-pool digit's centre
names the digit 74% of the time after crops alone (350 steps), 95% after 250 crop steps + 90 scene steps
(mixed10). On mixed7, 250 crop steps left the network under-trained (it read train-pool digits no better than
val-pool ones): 500 read more of them (docs/experiments.md).

Adam with linear warm-up and cosine decay per phase; bfloat16 compute when asked (fast on CPUs with AMX/AVX-512
BF16 and on GPUs); the saved weights are float32. The report holds the held-out accuracy (val-pool crops after
phase 1; val-pool scene cells and digits (read_digit) at the end, with the final weights) and the time taken.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from pipeline import defaults
from pipeline.digits import demo
from pipeline.digits.scenes import (BACKGROUND, CENTRE, VARIED_FRACTION, crop_batches, labelled_scenes, pools,
                                    read_digit, render_scene, scene_batches, varied_fraction)
from pipeline.encoder import truncated
from pipeline.progress import Progress, format_seconds
from storage.weights import CELL_HEAD_FILE, write_cell_head

log = logging.getLogger("captioner")

WEIGHTS_FILE = "inception_v3_digits.weights.h5"   # tasks/demo.py names it too (without importing this)
BACKGROUND_WEIGHT = 0.3   # scene phase: ~90% of a scene's cells are background
CENTRE_POSITIVE_WEIGHT = 10.0   # scene phase: ~1% of a scene's cells hold a digit's centre
POSITION = CENTRE + 1   # with position_weight: the head's outputs POSITION, POSITION + 1 are the cell's row, column
# What a caller passing no settings gets (tests, benchmarks): [pretrain] of configs/luigi.cfg, the pools of
# [demo] seed, and what the stage passes from [encoder] (at 299 px, mixed10)
DEFAULTS = {**defaults.section("pretrain"), "pool_seed": defaults.section("demo")["seed"], "scene_size": 299,
            "layer": "mixed10", "crops_per_scene": 4, "val_crops": 512, "varied_fraction": VARIED_FRACTION}

def build_classifier(side: int, layer: str, like=None, positions: bool = False):
    """(base InceptionV3(include_top=False) at side×side, model uint8 images → logits (B, g, g, 12) float32 from
    `layer`: 11 class logits, then the centre logit, scenes.CENTRE; with `positions`, 14: then the cell's row and
    column, POSITION); with `like` (another such model), starting from its weights (InceptionV3's weights fit any
    input size). The base's blocks above `layer` are not trained (and stay as initialised in the saved file)."""
    import keras

    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(side, side, 3))
    images = keras.Input((side, side, 3), dtype="uint8", name="images")
    x = keras.applications.inception_v3.preprocess_input(keras.ops.cast(images, "float32"))
    features = truncated(base, layer)(x)
    logits = keras.layers.Conv2D(POSITION + 2 * positions, 1, dtype="float32", name="cell_logits")(features)
    model = keras.Model(images, logits, name="digits_pretraining")
    if like is not None:
        model.set_weights(like.get_weights())
    return base, model


def freeze_below(base, block: str) -> None:
    """Keep every layer of `base` below InceptionV3 block `block` (e.g. mixed3) as it is: the scene phase then
    computes no gradients for the stem and the 35×35 blocks, the costliest part of a 299-px backward pass (a step
    of 16 scenes in 0.45× the time: tests/benchmarks/bench_pretrain_freeze.py), while the crop phase has taught
    them the strokes. Frozen batch norms normalise with their moving (crop-phase) statistics, and
    recalibrate_batchnorm leaves those as they are. "all": freeze nothing."""
    if block != "all":
        names = [layer.name for layer in base.layers]
        for layer in base.layers[:names.index(block)]:
            layer.trainable = False


def pretrain(outdir, settings: dict, progress_callback=None) -> dict:
    """Train and write `outdir`/WEIGHTS_FILE (the base network, float32) and CELL_HEAD_FILE (the per-cell digit
    head, for the features of `<layer>+cell_scores`), and return the report dict. (Over 50 lines: the report
    written out in full, each measurement with what it measured.)"""
    import keras

    settings = {**DEFAULTS, **settings}
    keras.utils.set_random_seed(settings["seed"])
    policy = keras.mixed_precision.global_policy()
    if settings["bfloat16"]:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    split_pools = pools(settings["pool_seed"])
    size, seed = settings["scene_size"], settings["seed"]
    started = time.monotonic()
    try:
        positions = settings["position_weight"] > 0
        _, model = build_classifier(settings["crop"], settings["layer"], positions=positions)
        crop_losses = _fit(model, crop_batches(seed, split_pools["train"], settings), settings["steps"],
                           settings, "crops", 1.0, progress_callback)
        crop_accuracy = evaluate(model, split_pools["val"], settings)
        train_size = settings["scene_train_size"] or size   # the batch norms and the report: at `size`
        scene_base, scene_model = build_classifier(train_size, settings["layer"], like=model, positions=positions)
        freeze_below(scene_base, settings["scene_train_from"])
        scene_losses = _fit(scene_model, scene_batches(seed + 1, split_pools["train"], settings["scene_batch_size"],
                                                       train_size, settings["layer"], varied_fraction(settings)),
                            settings["scene_steps"], settings, "scenes", BACKGROUND_WEIGHT, progress_callback,
                            settings["position_weight"])
    finally:   # extraction later in this process must build a float32 encoder
        keras.mixed_precision.set_global_policy(policy)
    seconds = time.monotonic() - started
    final = recalibrate_batchnorm(scene_base, split_pools["train"], settings, settings["scene_train_from"])
    final.save_weights(str(Path(outdir) / WEIGHTS_FILE))
    kernel, bias = scene_model.get_layer("cell_logits").get_weights()   # the classes and the centre: 12 outputs
    write_cell_head(Path(outdir) / CELL_HEAD_FILE, kernel.reshape(kernel.shape[-2:])[:, :POSITION], bias[:POSITION],
                    settings["layer"],
                    [str(d) for d in range(BACKGROUND)] + ["background", "centre"])
    head = scene_model.get_layer("cell_logits")
    scene_accuracy = evaluate_scenes(final, head, split_pools["val"], settings)
    varied_accuracy = evaluate_scenes(final, head, split_pools["val"], settings, varied=1.0)
    yardstick_accuracy = evaluate_scenes(final, head, split_pools["val"], settings, renderer="yardstick")
    total = time.monotonic() - started
    report = {"pretrained_on": "scikit-learn handwritten digits (load_digits), the demo's train pool "
                               f"([demo] seed {settings['pool_seed']}), never ImageNet",
              "task": f"name the digit (or background) under each {settings['layer']} cell: of windows of "
                      f"{size}-px scenes resized to the crop size, then of whole "
                      f"{train_size}-px scenes, whose cells also say whether a digit's centre lies in them"
                      + (" and where they lie" if positions else ""),
              "settings": settings, "train_samples": len(split_pools["train"]),
              "seconds": round(total, 1), "training_seconds": round(seconds, 1),
              "final_loss": {"crops": _tail_mean(crop_losses), "scenes": _tail_mean(scene_losses)},
              "held_out": {"pool": "val",
                           "scenes": {"what": f"{size}-px val-pool scenes, final weights (what extraction uses)",
                                      **scene_accuracy},
                           "varied_scenes": {"what": f"varied {size}-px val-pool scenes (render_varied: other "
                                                     "sizes, aspects, glyph widths, backgrounds, inks, placements), "
                                                     "final weights", **varied_accuracy},
                           "yardstick_scenes": {"what": f"{size}-px val-pool scenes drawn by the independent "
                                                        "yardstick's renderer (pipeline/digits/yardstick.py: other "
                                                        "code and parameters), final weights", **yardstick_accuracy},
                           "crops": {"what": f"{settings['crop']}-px crops of val-pool scenes after the crop "
                                             "phase", **crop_accuracy}}}
    log.info("digits encoder trained in %s; held-out (val pool) scenes: %.3f of the digits read right "
             "(%.3f of the scenes wholly), cells: digits %.3f, background %.3f; varied scenes: %.3f of the digits "
             "(%.3f of the scenes wholly); the yardstick's scenes: %.3f of the digits; digits counted by their "
             "centre cells: %.3f, %.3f and %.3f of the scenes", format_seconds(total),
             scene_accuracy["digits"], scene_accuracy["scenes_all_digits_right"], scene_accuracy["digit_cells"],
             scene_accuracy["background_cells"], varied_accuracy["digits"], varied_accuracy["scenes_all_digits_right"],
             yardstick_accuracy["digits"], *(a["scenes_counted_by_centres"]
                                             for a in (scene_accuracy, varied_accuracy, yardstick_accuracy)))
    if positions:
        log.info("digits encoder: its position outputs place %.3f of the held-out scenes' cells exactly",
                 scene_accuracy["cells_placed"])
    return report


def _tail_mean(losses: list[float]):
    return round(float(np.mean(losses[-20:])), 4) if losses else None


def _fit(model, batches, steps: int, settings: dict, what: str, background_weight: float,
         progress_callback, position_weight: float = 0.0) -> list[float]:
    """One phase: Adam (warm-up, cosine decay) on `steps` batches, a compiled step fed by a background thread
    that renders the next batches. Background cells weigh `background_weight` against a digit cell's 1. Batches
    of (images, labels, centres) (whole scenes) also train the centre logit: binary cross-entropy per cell, a
    centre cell weighing CENTRE_POSITIVE_WEIGHT, and with `position_weight` the cell's row and column (the squared
    distance from cell_positions, per cell); crops (images, labels) leave them untrained."""
    import keras
    import tensorflow as tf

    if steps == 0:
        return []
    warmup = min(settings["warmup_steps"], steps // 2)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(steps - warmup, 1), warmup_target=settings["learning_rate"], warmup_steps=warmup)
    optimizer = keras.optimizers.Adam(schedule, global_clipnorm=5.0)

    @tf.function(reduce_retracing=True)
    def step(images, labels, centres=None):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_cell = keras.losses.sparse_categorical_crossentropy(labels, logits[..., :CENTRE], from_logits=True)
            weights = tf.where(labels == BACKGROUND, background_weight, 1.0)
            loss = tf.reduce_sum(per_cell * weights) / tf.reduce_sum(weights)
            if centres is not None:
                loss += tf.reduce_mean(tf.nn.weighted_cross_entropy_with_logits(
                    centres, logits[..., CENTRE], CENTRE_POSITIVE_WEIGHT))
                if position_weight:
                    where = tf.constant(cell_positions(logits.shape[1]))
                    squared = tf.reduce_sum(tf.square(logits[..., POSITION:] - where), axis=-1)
                    loss += position_weight * tf.reduce_mean(squared)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    batches = _prefetch(batches, depth=4)
    progress = Progress(steps, f"pretraining the digits encoder on {what}", "steps", progress_callback, every=10)
    losses = []
    for _ in range(steps):
        losses.append(float(step(*(tf.constant(part) for part in next(batches)))))
        progress.update()
        if progress.done % 50 == 0:
            log.info("pretraining on %s, step %d/%d: loss %.4f (mean of the last 50)", what, progress.done, steps,
                     np.mean(losses[-50:]))
    return losses


def recalibrate_batchnorm(base, pool, settings: dict, from_block: str = "all"):
    """InceptionV3 at the scene size with `base`'s weights and every BatchNormalization's moving mean and
    variance re-estimated on `bn_scenes` whole train-pool scenes at that size — from block `from_block` up when
    the scene phase trained only those (scene_train_from): the blocks above were trained on the frozen layers'
    normalisation, and re-estimating theirs too would shift what those blocks see (held-out digit cells 0.54).

    Why: a network trained on small crops normalises with statistics of small crops. On a 299-px scene the
    upper blocks see 8×8 maps of mostly background, and with crop statistics their activations blow up
    (mixed10 values in the thousands, every image's features alike: mean cosine 0.99998 between images).
    Re-estimating the statistics where the encoder is used ("precise BN") brings them back to scale; the
    weights are unchanged. Each batch runs in training mode, and momentum 1 − 1/(k+1) at batch k makes the
    moving statistics the plain average over all batches."""
    import keras

    size = settings["scene_size"]
    scene = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(size, size, 3))
    scene.set_weights(base.get_weights())
    freeze_below(scene, from_block)   # frozen batch norms normalise with their moving statistics in training mode
    norms = [layer for layer in scene.layers if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    run = truncated(scene, settings["layer"])   # the batch norms above the feature layer are never used
    digits, rng = demo.load_digits(), np.random.default_rng(settings["seed"] + 7)
    batch = 16
    progress = Progress(settings["bn_scenes"], "re-estimating batch norm on scenes", "scenes", every=10)
    for k in range(max(1, settings["bn_scenes"] // batch)):
        scenes = np.stack([render_scene(rng, digits.images, digits.target, pool, size, varied_fraction(settings))[0]
                           for _ in range(batch)])
        for layer in norms:
            layer.momentum = 1.0 - 1.0 / (k + 1)
        run(keras.applications.inception_v3.preprocess_input(scenes.astype(np.float32)), training=True)
        progress.update(batch)
    for layer in norms:
        layer.momentum = 0.99   # Keras' InceptionV3 default, should anyone train it further
    for layer in scene.layers:
        layer.trainable = True
    return scene


def _prefetch(iterator, depth: int):
    """Run `iterator` in a daemon thread, `depth` items ahead (numpy and Pillow release the GIL); an error there
    is raised here, where the items are consumed (not left to a thread while training waits for ever)."""
    import queue

    items = queue.Queue(maxsize=depth)

    def fill():
        try:
            for item in iterator:
                items.put((item, None))
        except BaseException as error:   # noqa: B036 (handed over to the consumer, which raises it)
            items.put((None, error))

    threading.Thread(target=fill, daemon=True).start()
    while True:
        item, error = items.get()
        if error is not None:
            raise error
        yield item


def evaluate(model, pool, settings: dict) -> dict:
    """Accuracy on `val_crops` crops of scenes drawn from `pool` (a held-out pool; demo and varied scenes as
    pretraining mixes them), with a fixed seed."""
    batches = crop_batches(settings["seed"] + 1_000_003, pool, {**settings, "batch_size": 64})
    n = max(1, settings["val_crops"] // 64)
    return {**_accuracy((labels, model(images)) for images, labels in (next(batches) for _ in range(n))),
            "crops": n * 64}


def evaluate_scenes(base, head, pool, settings: dict, varied: float = 0.0, renderer: str = "pretraining") -> dict:
    """Accuracy on `val_scenes` whole scenes drawn from `pool` (a held-out pool), the demo's, (varied = 1) varied
    ones or (renderer "yardstick") the independent yardstick's: `base` (the saved float32 network) followed by
    the 1×1 convolution `head` — per cell, and per digit as read_digit reads it (with the share of scenes whose
    every digit is read right, and the share read right of each digit 0–9); with position outputs, the share of
    cells whose row and column they give (rounded to the grid) exactly: cells_placed."""
    import keras

    batch, layer = 16, settings["layer"]
    batches = labelled_scenes(settings["seed"] + 1_000_003, pool, batch, settings["scene_size"], layer, varied,
                              renderer)
    run = truncated(base, layer)
    cells, read, scenes_right, by_digit, counted, placed = [], [], [], {d: [] for d in range(BACKGROUND)}, [], []
    for _ in range(max(1, settings["val_scenes"] // batch)):
        images, labels, scene_boxes = next(batches)
        logits = np.asarray(head(run(keras.applications.inception_v3.preprocess_input(images.astype(np.float32)),
                                     training=False)))
        cells.append((labels, logits))
        if logits.shape[-1] > POSITION:
            g = logits.shape[1]
            grid = np.rint((logits[..., POSITION:] + 1) / 2 * (g - 1))
            placed.append(np.all(grid == np.stack(np.indices((g, g)), axis=-1), axis=-1).ravel())
        for scene_logits, boxes in zip(logits, scene_boxes):
            right = [read_digit(scene_logits, box, layer) == box[4] for box in boxes]
            read += right
            scenes_right.append(all(right))
            counted.append(count_centres(scene_logits[..., CENTRE]) == len(boxes))
            for box, ok in zip(boxes, right):
                by_digit[box[4]].append(ok)
    return {**_accuracy(cells), "scenes": len(scenes_right), "digits": round(float(np.mean(read)), 4),
            "digits_read": len(read), "scenes_all_digits_right": round(float(np.mean(scenes_right)), 4),
            "scenes_counted_by_centres": round(float(np.mean(counted)), 4),
            **({"cells_placed": round(float(np.mean(np.concatenate(placed))), 4)} if placed else {}),
            "by_digit": {str(d): round(float(np.mean(oks)), 4) if oks else None for d, oks in by_digit.items()}}


def cell_positions(g: int) -> np.ndarray:
    """(g, g, 2) float32: each cell's row and column, −1 to 1 over the grid: the position outputs' targets."""
    axis = np.linspace(-1.0, 1.0, g, dtype=np.float32)
    return np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1)


def count_centres(centre_logits) -> int:
    """How many digits the centre logits (g, g) find: cells above probability 0.5 that no neighbour (of the 3×3
    around them) exceeds."""
    padded = np.pad(centre_logits, 1, constant_values=-np.inf)
    g = centre_logits.shape[0]
    around = np.max([padded[i:i + g, j:j + g] for i in range(3) for j in range(3)], axis=0)
    return int(np.sum((centre_logits > 0) & (centre_logits >= around)))


def _accuracy(labels_and_logits) -> dict:
    """Accuracy per digit cell and per background cell over (labels (B, g, g), logits (B, g, g, 12)) pairs."""
    correct = {"digit": 0, "background": 0}
    total = {"digit": 0, "background": 0}
    for labels, logits in labels_and_logits:
        right = np.argmax(np.asarray(logits)[..., :CENTRE], axis=-1) == labels
        digit = labels != BACKGROUND
        for key, mask in (("digit", digit), ("background", ~digit)):
            correct[key] += int(right[mask].sum())
            total[key] += int(mask.sum())
    share = lambda k: round(correct[k] / total[k], 4) if total[k] else None
    return {"digit_cells": share("digit"), "background_cells": share("background"),
            "digit_cell_count": total["digit"]}
