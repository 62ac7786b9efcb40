"""The independent yardstick's renderer: digit scenes drawn from a specification, not by the demo's renderer
(demo.py) nor by the pretraining's varied scenes (scenes.py render_varied): other code, other parameters. It
draws the scenes of tests/digit_yardstick.py (a COCO 2017 form dataset of them, with its own phrasings) and the
pretraining report's held-out `yardstick_scenes`.

Rendering (the demo's choices in brackets):
- image height 128..480 px, aspect W/H log-uniform in 1:2..3:1, width at most 1200 px [180..520 × 120..360];
- digit height 0.1..0.85 of the image height, uniform per image, ±12% per digit, shrunk when the digits do not
  fit [cells of 40..100 px ±15%]; a box is the glyph's ink extent (the sample's empty columns cropped) [the
  whole cell];
- glyph width = its natural width × a squash/stretch of 0.5..1.2 per image, ±8% per digit [cell 0.85..1 ×
  its height];
- 1–4 digits anywhere in the image: boxes apart by a gap, x centres apart by half the wider box, the
  left-to-right order is that of the box x centres [one row, strictly left to right];
- upscaling of the float glyph (Pillow mode F) bilinear or bicubic, stroke weight varied by a gamma 0.6..1.5,
  opacity 0.85..1 [8-bit glyph, linear coverage];
- background grey 128..250 with a tint of ±10 per channel, on 60% of the images a linear gradient of ±5..20
  in a random direction, Gaussian luminance noise σ 1..10 plus colour noise σ 0..3 [190..255 per channel,
  luminance noise σ 2..10];
- ink of any hue and saturation, HSV value at most min(100, darkest background − 55) [0..90 per channel];
- JPEG quality 70..95 [90].
"""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

HEIGHT_RANGE = (128, 480)           # image height, px
ASPECT_RANGE = (0.5, 3.0)           # image width / height
MAX_WIDTH = 1200
DIGIT_HEIGHT_RANGE = (0.10, 0.85)   # digit (ink) height / image height
MIN_DIGIT_PX = 12
SQUASH_RANGE = (0.5, 1.2)           # glyph width relative to its natural width
BACKGROUND_RANGE = (128, 250)       # background grey level before tint, gradient and noise
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _glyph(sample: np.ndarray, width: int, height: int, resample, gamma: float, opacity: float) -> np.ndarray:
    """Ink coverage in [0, 1] of an 8×8 sample (0..16) cropped to its inked columns and rows, stretched to
    (height, width) by a float resize."""
    rows, cols = np.flatnonzero(sample.any(1)), np.flatnonzero(sample.any(0))
    crop = sample[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32) / 16
    big = np.asarray(Image.fromarray(crop, "F").resize((width, height), resample), np.float32)
    return np.clip(big, 0, 1) ** gamma * opacity


def inked_columns(sample: np.ndarray) -> int:
    """Width in columns of a sample's ink (from the first to the last inked column)."""
    cols = np.flatnonzero(sample.any(0))
    return int(cols[-1] - cols[0] + 1)


def _apart(a, b, gap: int) -> bool:
    """Boxes (x, y, w, h) separated by at least `gap` px, x centres by half the wider box."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    separate = ax + aw + gap <= bx or bx + bw + gap <= ax or ay + ah + gap <= by or by + bh + gap <= ay
    return separate and abs((ax + aw / 2) - (bx + bw / 2)) >= max(aw, bw) / 2 + 1


def _place(rng, sizes, width: int, height: int, margin: int, gap: int, tries: int = 60):
    """Random non-overlapping positions for boxes of `sizes` [(w, h)], or None."""
    for _ in range(8):
        boxes = []
        for w, h in sizes:
            if w > width - 2 * margin or h > height - 2 * margin:
                return None
            for _ in range(tries):
                box = (int(rng.integers(margin, width - w - margin + 1)),
                       int(rng.integers(margin, height - h - margin + 1)), w, h)
                if all(_apart(box, other, gap) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
    return None


def _layout(rng, digit_images, samples):
    """(width, height, [(sample, (x, y, w, h))] sorted by box x centre)."""
    aspect = float(np.exp(rng.uniform(*np.log(ASPECT_RANGE))))
    height = int(rng.integers(HEIGHT_RANGE[0], min(HEIGHT_RANGE[1], int(MAX_WIDTH / aspect)) + 1))
    width = int(np.clip(round(height * aspect), np.ceil(ASPECT_RANGE[0] * height), ASPECT_RANGE[1] * height))
    margin, gap = max(2, round(0.02 * min(width, height))), max(2, round(0.01 * max(width, height)))
    fraction = rng.uniform(*DIGIT_HEIGHT_RANGE)
    squash = rng.uniform(*SQUASH_RANGE)
    natural = [inked_columns(digit_images[k]) for k in samples]   # of 8 rows, all inked
    jitter_h, jitter_w = rng.uniform(0.88, 1.12, len(samples)), rng.uniform(0.92, 1.08, len(samples))
    low = int(np.ceil(max(DIGIT_HEIGHT_RANGE[0] * height, MIN_DIGIT_PX)))
    high = int(DIGIT_HEIGHT_RANGE[1] * height)
    while True:
        hs = [int(np.clip(round(fraction * j * height), low, high)) for j in jitter_h]
        sizes = [(max(3, int(round(h * n / 8 * squash * j))), h) for h, n, j in zip(hs, natural, jitter_w)]
        boxes = _place(rng, sizes, width, height, margin, gap)
        if boxes is not None:
            break
        if max(hs) <= low:
            raise RuntimeError(f"cannot place {len(samples)} digits in {width}x{height}")
        fraction *= 0.85
    return width, height, sorted(zip(samples, boxes), key=lambda sb: sb[1][0] + sb[1][2] / 2)


def _background(rng, width: int, height: int) -> np.ndarray:
    """Grey 128..250 with a tint, an optional gentle gradient: float32 (height, width, 3), before noise."""
    grey = rng.uniform(*BACKGROUND_RANGE)
    tint = rng.uniform(-10, 10, 3)
    level = np.full((height, width), grey, np.float32)
    if rng.random() < 0.6:
        angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(5, 20)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = np.cos(angle) * xx / width + np.sin(angle) * yy / height
        ramp -= ramp.min()
        level += np.float32(amplitude) * (2 * ramp / max(float(ramp.max()), 1e-6) - 1)
    return np.clip(level[..., None] + tint.astype(np.float32), 0, 255)


def render(rng: np.random.Generator, digit_images, samples) -> tuple[np.ndarray, list[int], list[tuple]]:
    """One scene of the digit samples (indices into digit_images (N, 8, 8)):
    → (RGB uint8 (height, width, 3), samples left to right, boxes [(x, y, w, h)] in the same order)."""
    width, height, placed = _layout(rng, digit_images, samples)
    image = _background(rng, width, height)
    floor = float((image @ LUMA).min())
    hue, saturation = rng.random(), rng.random()
    value = rng.uniform(0, min(100.0, floor - 55)) / 255
    ink = np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32) * 255
    gamma, opacity = float(np.exp(rng.uniform(np.log(0.6), np.log(1.5)))), rng.uniform(0.85, 1.0)
    for sample, (x, y, w, h) in placed:
        resample = Image.Resampling.BICUBIC if rng.random() < 0.5 else Image.Resampling.BILINEAR
        cover = _glyph(digit_images[sample], w, h, resample, gamma, opacity)[..., None]
        cell = image[y:y + h, x:x + w]
        image[y:y + h, x:x + w] = cell + cover * (ink - cell)
    image += rng.normal(0, rng.uniform(1, 10), (height, width, 1)).astype(np.float32)
    image += rng.normal(0, rng.uniform(0, 3), (height, width, 3)).astype(np.float32)
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return pixels, [s for s, _ in placed], [b for _, b in placed]
