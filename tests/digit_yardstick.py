"""An independent digit-scene yardstick in COCO 2017 form, rendered from a specification rather than by
pipeline/digits/demo.py's renderer:

    .venv/bin/python -m tests.digit_yardstick OUTDIR [--train 1200 --val 100 --test 200 --seed 5]

writes OUTDIR/train2017/ and OUTDIR/val2017/ (%012d.jpg; test images live in val2017, as in Karpathy's split of
COCO), OUTDIR/annotations/captions_{train,val}2017.json (each image with "digits" labels, "digit_boxes"
[x, y, w, h] in pixels left to right, and "digit_samples", indices into scikit-learn's load_digits()) and
OUTDIR/dataset_coco.json (the Karpathy split). Point a config at it like tests/coco2017_digits.py's dataset.

Why: the digits encoder (pipeline/digits/pretrain.py) is pretrained on the demo's own scenes and reads them well, so
a yardstick drawn by the same renderer measures how well it learned that renderer. These scenes share only the
glyphs' source with the demo, and only glyphs the encoder never saw: samples of the demo's VAL and TEST pools
(pipeline.digits.demo.sample_pools with the demo's seed 1797, as tests/coco2017_digits.py draws them), never its train
pool. Yardstick train images draw from the demo's val pool, yardstick val and test from the two halves of its
test pool, so the three splits share no sample either.

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

Captions: five of ten phrasings per image, none of them the demo's templates (pipeline.digits.demo.caption_templates)
or tests/coco2017_digits.py's forms, digits always as number words, e.g. for 4 0 7: "Three digits, namely four,
zero and seven.", "reading left to right: four, zero, seven", "a four, then a zero, then a seven", "four first,
then zero, seven last", "a three-digit code: four zero seven". Every caption is checked to satisfy
pipeline.digits.metrics.digit_sequence(caption) == labels: a number word followed within two tokens by "digit" or
"number" is a count, so no digit word ever stands right before those words.

Measured against the demo's renderer with `.venv/bin/python -m tests.digit_yardstick --probe 500` (500 scenes
of each, both of demo val-pool samples, before JPEG; digit height = box height / image height; glyph w/h = ink
width / height, for the demo its cell's share of inked sample columns; background = mean luminance outside
every box; ink lum. = 2nd percentile of the luminance inside the boxes):

                            p5    p25    p50    p75    p95    min    max
digit height  demo        0.15   0.22   0.30   0.41   0.62   0.11   0.85
              this        0.14   0.26   0.38   0.52   0.75   0.10   0.85
digit px      demo          42     54     70     85    103     35    114
              this          35     69    100    154    270     22    384
glyph w/h     demo        0.55   0.65   0.69   0.72   0.80   0.43   1.00
              this        0.38   0.49   0.62   0.76   0.89   0.25   1.09
aspect W/H    demo        0.79   1.15   1.59   2.19   3.31   0.56   4.29
              this        0.56   0.80   1.25   1.89   2.71   0.50   2.98
background    demo         201    212    222    230    241    194    249
              this         136    161    190    217    242    122    251
ink lum.      demo          20     33     46     62     77      3     94
              this          12     28     45     64     86      0    106
multi-digit scenes with neighbours sharing x range: demo 0%, this 33%

Relative digit heights (what the encoder sees after its squash to 299 px) overlap much: the demo's already
span 0.11..0.85. The renderings differ most in glyph resolution (8 sample rows drawn over 22..384 px, against
35..114), glyph width, portrait images, backgrounds down to mid-grey, and digits above one another in a third
of the multi-digit scenes.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import sys

import numpy as np
from PIL import Image

from pipeline.digits import demo
from pipeline.captions import tokenize
from pipeline.digits.metrics import digit_sequence

DEMO_SEED = 1797        # [demo] seed: the pools the digits encoder was pretrained from
SPLITS = ("train", "val", "test")
FOLDER = {"train": "train2017", "val": "val2017", "test": "val2017"}
HEIGHT_RANGE = (128, 480)           # image height, px
ASPECT_RANGE = (0.5, 3.0)           # image width / height
MAX_WIDTH = 1200
DIGIT_HEIGHT_RANGE = (0.10, 0.85)   # digit (ink) height / image height
MIN_DIGIT_PX = 12
SQUASH_RANGE = (0.5, 1.2)           # glyph width relative to its natural width
BACKGROUND_RANGE = (128, 250)       # background grey level before tint, gradient and noise
CAPTIONS_PER_IMAGE = 5
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ---------------------------------------------------------------------------------------------- captions

def _list(words: list[str]) -> str:
    """'four', 'four and zero', 'four, zero and seven'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _article(word: str) -> str:
    return ("an " if word == "eight" else "a ") + word


_COUNT = {1: "one digit", 2: "two digits", 3: "three digits", 4: "four digits"}


def phrasings():
    """Ten caption phrasings, each a function of the left-to-right number words (1..4 of them)."""
    def first_last(w):
        if len(w) == 1:
            return f"just {w[0]}"
        middle = "".join(f", then {x}" for x in w[1:-1])
        return f"{w[0]} first{middle}, {w[-1]} last"

    return (
        lambda w: f"{_COUNT[len(w)].capitalize()}, namely {_list(w)}." if len(w) != 2
        else f"A pair of digits, namely {_list(w)}.",
        lambda w: f"reading left to right: {', '.join(w)}" if len(w) > 1 else f"a lone {w[0]}",
        lambda w: (f"the digits {' '.join(w)} spread across the picture" if len(w) > 1
                   else f"the digit {w[0]} somewhere in the picture"),
        lambda w: ", then ".join(_article(x) for x in w) if len(w) > 1 else f"a single {w[0]}",
        lambda w: f"numerals {' '.join(w)}",
        lambda w: " ".join(w),
        lambda w: (f"There are {_COUNT[len(w)]} here; {_list(w)}." if len(w) > 1
                   else f"There is one digit here: {_article(w[0])}."),
        lambda w: f"The picture shows {_list(w)}.",
        first_last,
        lambda w: (f"a {_COUNT[len(w)].split()[0]}-digit code: {' '.join(w)}" if len(w) > 1
                   else f"a single digit: {w[0]}"),
    )


def captions_for(rng: np.random.Generator, labels: list[int]) -> list[str]:
    """Five different phrasings naming `labels` left to right; each is checked with digit_sequence."""
    forms = phrasings()
    words = [NUMBER_WORDS[d] for d in labels]
    out = [forms[k](words) for k in sorted(rng.choice(len(forms), CAPTIONS_PER_IMAGE, replace=False).tolist())]
    for caption in out:
        if digit_sequence(caption) != list(labels):
            raise AssertionError(f"caption {caption!r} names {digit_sequence(caption)}, not {labels}")
    return out


# --------------------------------------------------------------------------------------------- rendering

def _glyph(sample: np.ndarray, width: int, height: int, resample, gamma: float, opacity: float) -> np.ndarray:
    """Ink coverage in [0, 1] of an 8×8 sample (0..16) cropped to its inked columns and rows, stretched to
    (height, width) by a float resize."""
    rows, cols = np.flatnonzero(sample.any(1)), np.flatnonzero(sample.any(0))
    crop = sample[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32) / 16
    big = np.asarray(Image.fromarray(crop, "F").resize((width, height), resample), np.float32)
    return np.clip(big, 0, 1) ** gamma * opacity


def _inked_columns(sample: np.ndarray) -> int:
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
    natural = [_inked_columns(digit_images[k]) for k in samples]   # of 8 rows, all inked
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


# ----------------------------------------------------------------------------------------------- dataset

def pools() -> dict[str, np.ndarray]:
    """Digit samples per yardstick split: the demo's val pool for train, halves of its test pool for val and
    test. None of them is in the demo's train pool, the only one the digits encoder pretrained on."""
    demo_pools = demo.sample_pools(np.random.default_rng(DEMO_SEED), len(demo.load_digits().target))
    test = demo_pools["test"]
    return {"train": demo_pools["val"], "val": test[:len(test) // 2], "test": test[len(test) // 2:]}


def write_yardstick(out, train: int = 1200, val: int = 100, test: int = 200, seed: int = 5) -> dict:
    """Write the dataset into `out` (created; must be empty). Everything derives from default_rng(seed).
    → {"splits": {split: images}, "captions": n}."""
    counts = {"train": int(train), "val": int(val), "test": int(test)}
    os.makedirs(out, exist_ok=True)
    if os.listdir(out):
        raise ValueError(f"{out} is not empty")
    digits = demo.load_digits()
    split_pools = pools()
    rng = np.random.default_rng(seed)
    ids = iter(np.sort(rng.choice(999_999, size=sum(counts.values()), replace=False) + 1).tolist())
    os.makedirs(os.path.join(out, "annotations"))
    coco = {folder: {"images": [], "annotations": []} for folder in ("train2017", "val2017")}
    karpathy, caption_id = [], 1
    for split in SPLITS:
        folder = FOLDER[split]
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        for _ in range(counts[split]):
            image_id = next(ids)
            drawn = rng.choice(split_pools[split], size=int(rng.integers(1, 5))).tolist()
            pixels, samples, boxes = render(rng, digits.images, drawn)
            labels = [int(digits.target[k]) for k in samples]
            name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels, "RGB").save(os.path.join(out, folder, name), "JPEG",
                                                quality=int(rng.integers(70, 96)))
            coco[folder]["images"].append({"id": image_id, "file_name": name, "width": pixels.shape[1],
                                           "height": pixels.shape[0], "digits": labels,
                                           "digit_boxes": [list(b) for b in boxes], "digit_samples": samples})
            sentences = []
            for caption in captions_for(rng, labels):
                coco[folder]["annotations"].append({"id": caption_id, "image_id": image_id, "caption": caption})
                sentences.append({"raw": caption, "tokens": tokenize(caption), "imgid": len(karpathy),
                                  "sentid": caption_id})
                caption_id += 1
            karpathy.append({"cocoid": image_id, "filepath": folder, "filename": name, "split": split,
                             "imgid": len(karpathy), "sentids": [s["sentid"] for s in sentences],
                             "sentences": sentences})
    info = {"description": "digit yardstick: scikit-learn digits (demo val/test pools), independent renderer",
            "year": 1998}
    for folder, data in coco.items():
        with open(os.path.join(out, "annotations", f"captions_{folder}.json"), "w", encoding="utf-8") as f:
            json.dump({"info": info, "licenses": [], **data}, f)
    with open(os.path.join(out, "dataset_coco.json"), "w", encoding="utf-8") as f:
        json.dump({"dataset": "coco", "images": karpathy}, f)
    return {"splits": counts, "captions": caption_id - 1}


# ------------------------------------------------------------------------------------------------- probe

def _scene_stats(pixels: np.ndarray, boxes) -> tuple[list, float, float]:
    """([box height / image height], background mean luminance, ink luminance)."""
    height = pixels.shape[0]
    luma = pixels.astype(np.float32) @ LUMA
    inside = np.zeros(luma.shape, bool)
    for x, y, w, h in boxes:
        inside[y:y + h, x:x + w] = True
    ink = np.percentile(luma[inside], 2)
    return [h / height for _, _, _, h in boxes], float(luma[~inside].mean()), float(ink)


def probe(n: int = 500, seed: int = 0) -> str:
    """Distributions of n scenes from the demo's renderer and from this one (before JPEG), as a text table."""
    digits = demo.load_digits()
    demo_pools = demo.sample_pools(np.random.default_rng(DEMO_SEED), len(digits.target))
    split_pools = pools()
    stats, stacked = {}, {"demo": [], "this": []}
    for name in ("demo", "this"):
        rng = np.random.default_rng(seed)
        rows = {"digit height": [], "digit px": [], "glyph w/h": [], "aspect W/H": [], "background": [],
                "ink lum.": []}
        for _ in range(n):
            if name == "demo":
                samples = rng.choice(demo_pools["val"], size=int(rng.integers(1, 5))).tolist()
                pixels, boxes = demo.render_scene(rng, digits.images, samples)
                # A demo box is the whole 8-column cell: the glyph is its inked columns' share of it.
                glyphs = [w * _inked_columns(digits.images[k]) / 8 / h for k, (_, _, w, h) in zip(samples, boxes)]
            else:
                drawn = rng.choice(split_pools["train"], size=int(rng.integers(1, 5))).tolist()
                pixels, samples, boxes = render(rng, digits.images, drawn)
                glyphs = [w / h for _, _, w, h in boxes]   # a box is the glyph's ink extent
            heights, background, ink = _scene_stats(pixels, boxes)
            rows["digit height"] += heights
            rows["digit px"] += [h for *_, h in boxes]
            rows["glyph w/h"] += glyphs
            rows["aspect W/H"].append(pixels.shape[1] / pixels.shape[0])
            rows["background"].append(background)
            rows["ink lum."].append(ink)
            if len(boxes) > 1:
                stacked[name].append(any(a[0] + a[2] > b[0] and b[0] + b[2] > a[0]
                                         for a, b in zip(boxes, boxes[1:])))
        stats[name] = rows
    lines = [f"{'':23}" + "".join(f"{c:>7}" for c in ("p5", "p25", "p50", "p75", "p95", "min", "max"))]
    for quantity in stats["demo"]:
        for name in ("demo", "this"):
            values = np.asarray(stats[name][quantity])
            row = [*np.percentile(values, [5, 25, 50, 75, 95]), values.min(), values.max()]
            fmt = "{:7.2f}" if values.max() < 10 else "{:7.0f}"
            label = quantity if name == "demo" else ""
            lines.append(f"{label:14}{name:9}" + "".join(fmt.format(v) for v in row))
    lines.append("multi-digit scenes with neighbours sharing x range: " +
                 ", ".join(f"{name} {np.mean(v):.0%}" for name, v in stacked.items()))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", help="output directory (created; must be empty)")
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--probe", type=int, metavar="N",
                        help="instead: print distributions of N scenes of the demo's renderer and of this one")
    args = parser.parse_args(argv)
    if args.probe:
        print(probe(args.probe))
        return
    if not args.outdir:
        parser.error("OUTDIR is required (or --probe N)")
    print(write_yardstick(args.outdir, args.train, args.val, args.test, args.seed))


if __name__ == "__main__":
    main(sys.argv[1:])
