"""The pretraining's scenes and their per-cell labels (pipeline/digits/pretrain.py trains on them).

Data: scenes of 1–4 digits, 5% grayscale, through a JPEG round trip, resized to S×S (S = scene_size: the stage
passes `[encoder] image_size`, 299) exactly as feature extraction resizes them (Pillow bilinear, no crop). A third
are the demo's scenes (pipeline/digits/demo.py: one row of digits 40–100 px high, light backgrounds, JPEG q90); two
thirds (VARIED_FRACTION) are varied ones (render_varied), as photos and scans of digits vary: drawn at heights
120–480 px and aspects 1:2 to 3:1 and then squashed to the square, digits a tenth to most of the image high,
narrow to square glyphs, placed anywhere, backgrounds mid-grey to white with tints, gradients and noise, dark
inks of any hue, bilinear or bicubic upscaling, stroke weights, blur, JPEG q60–95. An encoder trained on the
demo's scenes alone reads them well but transfers badly to digit scenes rendered otherwise.

Target: per cell of the feature layer (`layer`: mixed10 or mixed7, pipeline.encoder.LAYERS; the network above
it is not run). InceptionV3's cell (i, j) is centred on input pixel (offset + stride·i, offset + stride·j)
(mixed10: 37.5 + 32 i; mixed7: 21.5 + 16 i; its strided layers are 'valid'); its label is the digit whose box
contains that point, or 10 = background. Whole scenes also mark each digit's centre cell (centre_cells: the
cell nearest the centre of its box), so the head learns where one glyph ends and the next begins: two alike
digits side by side are one blob of "8" cells but two centres.

    images uint8 (B, C, C, 3) → preprocess_input → InceptionV3 up to `layer` (B, g, g, D)
    → 1×1 convolution → logits (B, g, g, 12): 11 class logits → cross-entropy per cell,
                                               1 centre logit (CENTRE) → binary cross-entropy per cell
"""
from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageFilter

from pipeline.digits import demo, yardstick
from pipeline.digits.cell_scores import CLASSES
from pipeline.encoder import LAYERS, base_layer, cell_centres, grid_size


BACKGROUND = 10
CENTRE = CLASSES   # the head's last output, after the 11 classes: "a digit's centre lies in this cell" (a logit)
VARIED_FRACTION = 2 / 3   # of the pretraining scenes (both phases and the batch-norm scenes) varied; the rest demo

# The varied scenes: digits as photos and scans show them, not as the demo draws them. Each scene is drawn at its
# own size and aspect, then squashed to the encoder's square input as extraction does. Ranges (per image unless
# said otherwise):
VARIED_HEIGHT = (120, 480)          # image height, px
VARIED_ASPECT = (0.45, 3.3)         # width / height, log-uniform (portrait 1:2 to panorama 3:1, and a little beyond)
VARIED_DIGIT_HEIGHT = (0.08, 0.88)  # digit height / image height, uniform; ±10% per digit
VARIED_GLYPH_WIDTH = (0.45, 1.5)    # × the glyph's own ink width/height, log-uniform (narrow to square); ±8% per digit
VARIED_BACKGROUND = (115, 252)      # background grey level, plus a tint of ±15 per channel
VARIED_INK_CONTRAST = 50            # the ink's HSV value stays this far below the darkest background channel
VARIED_MAX_INK = 110                # ... and at most this
VARIED_JPEG = (60, 95)              # JPEG quality
VARIED_MARGIN, VARIED_GAP = 2, 3    # px between a glyph and the border / another glyph
UPSCALING = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def glyph_ink(sample) -> np.ndarray:
    """An 8×8 sample (values 0..16) as ink coverage 0..1, cut to its ink extent (the rows and columns with ink)."""
    ink = np.asarray(sample, np.float32) / 16
    rows, cols = np.flatnonzero(ink.max(1) > 0), np.flatnonzero(ink.max(0) > 0)
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def varied_layout(rng, glyphs) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """Image size and glyph boxes for `glyphs` (ink arrays): → (width, height, [(x, y, w, h)] in glyph order).

    The digits lie anywhere, apart by VARIED_GAP: no row, no order (the captions' left-to-right order would be that
    of the box centres; pretraining labels cells, not sequences). A glyph that finds no free place in 60 tries
    shrinks by a fifth and tries again."""
    height = int(rng.integers(VARIED_HEIGHT[0], VARIED_HEIGHT[1] + 1))
    width = int(round(height * np.exp(rng.uniform(*np.log(VARIED_ASPECT)))))
    digit = height * rng.uniform(*VARIED_DIGIT_HEIGHT)
    squash = np.exp(rng.uniform(*np.log(VARIED_GLYPH_WIDTH)))
    sizes = []
    for glyph in glyphs:
        h = digit * rng.uniform(0.9, 1.1)
        w = h * glyph.shape[1] / glyph.shape[0] * squash * rng.uniform(0.92, 1.08)
        sizes.append([h, w])
    sizes = np.asarray(sizes)
    # fit: each glyph inside the image, and all of them in 40% of its area (they need not share a row)
    room = np.sqrt(0.4 * width * height / (sizes[:, 0] * sizes[:, 1]).sum())
    sizes *= min(1.0, room, (height - 2 * VARIED_MARGIN) / sizes[:, 0].max(),
                 (width - 2 * VARIED_MARGIN) / sizes[:, 1].max())
    boxes = []
    for h, w in sizes:
        while True:
            h, w = max(int(round(h)), 6), max(int(round(w)), 2)
            for _ in range(60):
                x = int(rng.integers(VARIED_MARGIN, max(VARIED_MARGIN, width - w - VARIED_MARGIN) + 1))
                y = int(rng.integers(VARIED_MARGIN, max(VARIED_MARGIN, height - h - VARIED_MARGIN) + 1))
                if all(x + w + VARIED_GAP <= bx or bx + bw + VARIED_GAP <= x or y + h + VARIED_GAP <= by
                       or by + bh + VARIED_GAP <= y for bx, by, bw, bh in boxes):
                    break
            else:
                h, w = h * 0.8, w * 0.8
                continue
            boxes.append((x, y, w, h))
            break
    return width, height, boxes


def glyph_coverage(rng, glyphs, width: int, height: int, boxes) -> np.ndarray:
    """Ink coverage 0..1 (height, width) of glyphs (ink arrays) upscaled into their boxes (x, y, w, h), each
    bilinear or bicubic, with one stroke-weight gamma (0.6..1.6) and opacity (0.8..1) per image: 0 outside them."""
    coverage = np.zeros((height, width), np.float32)
    gamma, opacity = rng.uniform(0.6, 1.6), rng.uniform(0.8, 1.0)
    for glyph, (x, y, w, h) in zip(glyphs, boxes):
        resample = UPSCALING[int(rng.integers(len(UPSCALING)))]
        cell = np.asarray(Image.fromarray(glyph, "F").resize((w, h), resample), np.float32)
        coverage[y:y + h, x:x + w] = np.clip(cell, 0, 1) ** gamma * opacity
    return coverage


def render_varied(rng, digit_images, samples) -> tuple[np.ndarray, list[tuple]]:
    """A varied scene of the given digit samples (indices into digit_images (N, 8, 8)):
    → (RGB uint8 (height, width, 3), boxes [(x, y, w, h)] around each glyph's ink, in `samples` order).

    Background: grey VARIED_BACKGROUND with a tint, on half the images a linear gradient of up to ±25, luminance
    noise σ 1..12 and on half of them colour noise σ up to 4. Ink: any hue and saturation, dark (its value at most
    VARIED_MAX_INK and VARIED_INK_CONTRAST below the background). Glyphs: upscaled from 8×8 bilinear or bicubic
    (Pillow, float), stroke weight varied by a gamma of 0.6..1.6, opacity 0.8..1. One in five images slightly
    blurred."""
    glyphs = [glyph_ink(digit_images[k]) for k in samples]
    width, height, boxes = varied_layout(rng, glyphs)
    grey = rng.uniform(*VARIED_BACKGROUND)
    background = np.clip(grey + rng.uniform(-15, 15, 3), 0, 255).astype(np.float32)
    hue, saturation = rng.uniform(0, 1), rng.uniform(0, 1)
    value = rng.uniform(0, max(0.0, min(VARIED_MAX_INK, background.min() - VARIED_INK_CONTRAST))) / 255
    colour = np.asarray(colorsys.hsv_to_rgb(hue, saturation, value), np.float32) * 255
    coverage = glyph_coverage(rng, glyphs, width, height, boxes)
    shade = np.zeros((height, width), np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * np.linspace(-1, 1, width, dtype=np.float32)[None, :]
                + np.sin(angle) * np.linspace(-1, 1, height, dtype=np.float32)[:, None])
        shade += ramp * np.float32(rng.uniform(-25, 25))
    shade += rng.standard_normal((height, width), dtype=np.float32) * np.float32(rng.uniform(1, 12))
    colour_noise = rng.uniform(0, 4) if rng.random() < 0.5 else 0.0
    image = np.empty((height, width, 3), np.uint8)
    for ch in range(3):
        plane = (background[ch] + shade) * (1 - coverage) + colour[ch] * coverage
        if colour_noise:
            plane += rng.standard_normal((height, width), dtype=np.float32) * np.float32(colour_noise)
        image[..., ch] = np.clip(plane, 0, 255)
    if rng.random() < 0.2:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2))))
    return image, boxes


def cell_labels(boxes, x0: float, y0: float, crop: int, layer: str, scale: float = 1.0) -> np.ndarray:
    """(g, g) int labels of the `layer` cells of a crop whose top-left corner is (x0, y0) in scene pixels and
    whose pixels are `scale` scene pixels each: the digit whose box (x, y, w, h, label) contains the cell's
    centre, else BACKGROUND."""
    g = grid_size(crop, layer)
    centres = cell_centres(g, layer) * scale
    labels = np.full((g, g), BACKGROUND, np.int32)
    for x, y, w, h, label in boxes:
        labels[np.ix_(_inside(y0 + centres, y, h), _inside(x0 + centres, x, w))] = label
    return labels


def _inside(centres, start: float, length: float) -> np.ndarray:
    """Which of the cell centres (pixel rows or columns) lie in [start, start + length)."""
    return (centres >= start) & (centres < start + length)


def scene_labels(boxes, size: int, layer: str) -> np.ndarray:
    """(g, g) labels of a whole size×size scene: cell_labels, plus each digit on the cell nearest its centre
    (a digit narrower than the cell stride may contain no cell centre)."""
    labels = cell_labels(boxes, 0, 0, size, layer)
    for x, y, w, h, label in boxes:
        labels[nearest_cell(y + h / 2, labels.shape[0], layer), nearest_cell(x + w / 2, labels.shape[0], layer)] = label
    return labels


def centre_cells(boxes, size: int, layer: str) -> np.ndarray:
    """(g, g) float32 of a whole size×size scene: 1 on the cell nearest each digit's box centre, else 0."""
    g = grid_size(size, layer)
    centres = np.zeros((g, g), np.float32)
    for x, y, w, h, _ in boxes:
        centres[nearest_cell(y + h / 2, g, layer), nearest_cell(x + w / 2, g, layer)] = 1.0
    return centres


def nearest_cell(centre: float, g: int, layer: str) -> int:
    """The row (or column) of the `layer` cell whose centre is nearest pixel row (column) `centre`, of g."""
    spec = LAYERS[base_layer(layer)]
    return int(np.clip(round((centre - spec["offset"]) / spec["stride"]), 0, g - 1))


def render_scene(rng, digit_images, targets, pool, size: int, varied: float = 0.0) -> tuple[np.ndarray, list[tuple]]:
    """A scene of 1–4 digits from `pool` — varied (render_varied, JPEG quality VARIED_JPEG) with probability
    `varied`, else the demo's (pipeline/digits/demo.py, JPEG quality 90) — 5% grayscale, JPEG round trip, resized to
    size×size (Pillow bilinear, as extraction squashes an image): → (uint8 (size, size, 3), boxes
    [(x, y, w, h, label)] in resized pixels)."""
    samples = rng.choice(pool, size=int(rng.integers(1, 5))).tolist()
    if varied and rng.random() < varied:
        pixels, boxes = render_varied(rng, digit_images, samples)
        quality = int(rng.integers(VARIED_JPEG[0], VARIED_JPEG[1] + 1))
    else:
        pixels, boxes = demo.render_scene(rng, digit_images, samples)
        quality = demo.JPEG_QUALITY
    height, width = pixels.shape[:2]
    image = Image.fromarray(pixels, "RGB")
    if rng.random() < demo.GRAYSCALE_FRACTION:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    image = Image.open(buffer).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    sx, sy = size / width, size / height
    scaled = [(x * sx, y * sy, w * sx, h * sy, int(targets[k])) for (x, y, w, h), k in zip(boxes, samples)]
    return np.asarray(image, np.uint8), scaled


def varied_fraction(settings: dict) -> float:
    """The share of varied scenes pretraining renders (settings' varied_fraction, else VARIED_FRACTION)."""
    return float(settings.get("varied_fraction", VARIED_FRACTION))


def sample_crops(rng, scene, boxes, crop: int, n: int, layer: str):
    """n square windows of a scene resized to crop×crop: → [(uint8 (crop, crop, 3), labels (g, g))].

    Five in six frame one digit whole — side 1.05–1.4 × its larger side, centre jittered by up to 15% —
    so the network sees complete glyphs with a little of their neighbours, at 0.4–1× the scale of a
    299-px scene; one in six is anywhere (60–150 px), so background and borders are learnt too."""
    size = scene.shape[0]
    image = Image.fromarray(scene)
    out = []
    for _ in range(n):
        if rng.random() < 1 / 6:
            side = rng.uniform(60, 150)
            x0, y0 = rng.uniform(0, size - side, 2)
        else:
            x, y, w, h, _ = boxes[int(rng.integers(len(boxes)))]
            side = min(max(w, h) * rng.uniform(1.05, 1.4), size)
            cx, cy = x + w * rng.uniform(0.35, 0.65), y + h * rng.uniform(0.35, 0.65)
            x0 = min(max(cx - side / 2, 0), size - side)
            y0 = min(max(cy - side / 2, 0), size - side)
        window = image.resize((crop, crop), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        out.append((np.asarray(window, np.uint8), cell_labels(boxes, x0, y0, crop, layer, side / crop)))
    return out


def crop_batches(seed: int, pool, settings: dict):
    """Endless (crops uint8 (B, C, C, 3), labels (B, g, g)) batches from scenes of `pool`'s digits."""
    digits = demo.load_digits()
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    while True:
        scene, boxes = render_scene(rng, digits.images, digits.target, pool, settings["scene_size"],
                                    varied_fraction(settings))
        for image, label in sample_crops(rng, scene, boxes, settings["crop"], settings["crops_per_scene"],
                                         settings["layer"]):
            crops.append(image)
            labels.append(label)
            if len(crops) == settings["batch_size"]:
                yield np.stack(crops), np.stack(labels)
                crops, labels = [], []


def scene_batches(seed: int, pool, batch_size: int, size: int, layer: str, varied: float = VARIED_FRACTION):
    """Endless (scenes uint8 (B, size, size, 3), labels (B, g, g), centres (B, g, g)) batches of whole scenes of
    `pool`'s digits, a share `varied` of them varied (render_scene); centres: centre_cells."""
    return ((scenes, labels, np.stack([centre_cells(b, size, layer) for b in boxes]))
            for scenes, labels, boxes in labelled_scenes(seed, pool, batch_size, size, layer, varied))


def render_yardstick_scene(rng, digit_images, targets, pool, size: int) -> tuple[np.ndarray, list[tuple]]:
    """A scene of 1–4 digits from `pool` drawn by the independent yardstick's renderer (yardstick.py), JPEG
    quality 70–95, resized to size×size as extraction does: → (uint8 (size, size, 3), boxes [(x, y, w, h, label)]
    in resized pixels). Not a training scene: the pretraining report measures the encoder on these."""
    samples = rng.choice(pool, size=int(rng.integers(1, 5))).tolist()
    pixels, ordered, boxes = yardstick.render(rng, digit_images, samples)
    height, width = pixels.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
    image = Image.open(buffer).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    sx, sy = size / width, size / height
    scaled = [(x * sx, y * sy, w * sx, h * sy, int(targets[k])) for (x, y, w, h), k in zip(boxes, ordered)]
    return np.asarray(image, np.uint8), scaled


def labelled_scenes(seed: int, pool, batch_size: int, size: int, layer: str, varied: float = VARIED_FRACTION,
                    renderer: str = "pretraining"):
    """scene_batches with each batch's boxes too: endless (scenes, labels, [[(x, y, w, h, label)] per scene]).
    renderer "yardstick": the independent yardstick's scenes instead (render_yardstick_scene)."""
    digits = demo.load_digits()
    rng = np.random.default_rng(seed)
    draw = (lambda: render_yardstick_scene(rng, digits.images, digits.target, pool, size)) if renderer == "yardstick" \
        else (lambda: render_scene(rng, digits.images, digits.target, pool, size, varied))
    while True:
        scenes = [draw() for _ in range(batch_size)]
        boxes = [b for _, b in scenes]
        yield np.stack([s for s, _ in scenes]), np.stack([scene_labels(b, size, layer) for b in boxes]), boxes


def pools(pool_seed: int) -> dict:
    """The demo's digit-sample pools for [demo] seed = pool_seed (train / val / test, disjoint)."""
    return demo.sample_pools(np.random.default_rng(pool_seed), len(demo.load_digits().target))


def read_digit(logits, box, layer: str) -> int:
    """The digit a box (x, y, w, h, …) of a scene shows, read from the cell head's (g, g, 11 or 12) logits (a
    centre logit is not a class and is left out): the digit with the largest probability summed over the cells
    whose centres lie in the box, or on the cell nearest the box's centre when none does (the readout of a
    linear probe given the digit boxes)."""
    g = logits.shape[0]
    x, y, w, h = box[:4]
    centres = cell_centres(g, layer)
    rows, cols = _inside(centres, y, h), _inside(centres, x, w)
    if not rows.any() or not cols.any():
        rows = np.arange(g) == nearest_cell(y + h / 2, g, layer)
        cols = np.arange(g) == nearest_cell(x + w / 2, g, layer)
    scores = logits[np.ix_(rows, cols)][..., :CENTRE].reshape(-1, CENTRE).astype(np.float64)
    probabilities = np.exp(scores - scores.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    return int(np.argmax(probabilities[:, :BACKGROUND].sum(0)))
