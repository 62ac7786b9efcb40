"""Built-in offline demo dataset ("digits") written in COCO captions format.

Images are composed from scikit-learn's bundled handwritten digits (1,797 real 8x8 grayscale
samples, values 0..16, 43 writers), so the demo needs no download. The output deliberately goes
through the same code path as real COCO: COCO-style caption JSON per split, COCO-2014-style file
names, and a Karpathy-style split file.
"""
import os
import re

import numpy as np
from PIL import Image

from storage.workspace import write_json

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNT_WORDS = (None, "one", "two", "three", "four")  # indexed by number of digits (1..4)
SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5
POOL_FRACTIONS = (0.70, 0.15)  # train, val; the remainder of the samples is the test pool
GRAYSCALE_FRACTION = 0.05
MIN_MARGIN, MIN_GAP = 8, 6  # px kept free at the image border / between neighbouring digits
WIDTH_RANGE, HEIGHT_RANGE = (180, 520), (120, 360)  # inclusive, px
JPEG_QUALITY = 90
# Fixed metadata: anything time-dependent would break byte-identical reruns. 1998 is when the
# UCI optdigits data behind load_digits() was published.
DATE_CREATED, DATE_CAPTURED = "1998/07/01", "1998-07-01 00:00:00"
INFO = {"description": "Show-Attend-Tell offline demo: handwritten digits (scikit-learn load_digits)",
        "url": "https://archive.ics.uci.edu/dataset/80", "version": "1.0", "year": 1998,
        "contributor": "UCI optdigits via scikit-learn", "date_created": DATE_CREATED}
LICENSES = [{"id": 1, "name": "Attribution License (CC BY 4.0)",
             "url": "https://creativecommons.org/licenses/by/4.0/"}]


def _a(word):
    """'a seven' / 'an eight' (eight is the only number word starting with a vowel sound)."""
    return ("an " if word == "eight" else "a ") + word


def _and(items):
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_templates():
    """Caption templates: each maps the left-to-right number words (1..4 of them) to a caption.

    Casing, trailing periods/spaces, double spaces and stray commas vary on purpose, as in real
    COCO captions, so that the pipeline's caption normalisation is exercised.
    """
    def s(w):
        return "s" if len(w) > 1 else ""

    return (
        lambda w: f"{COUNT_WORDS[len(w)].capitalize()} handwritten digit{s(w)}: {_and(w)}.",
        lambda w: f"{_and([_a(x) for x in w])} from left to right" if len(w) > 1 else f"just {_a(w[0])}",
        lambda w: f"The handwritten number {' '.join(w)} ",
        lambda w: f"Digit{s(w)} {', '.join(w)} written in dark ink.",
        lambda w: f"an image of {COUNT_WORDS[len(w)]} handwritten digit{s(w)} reading {' '.join(w)}",
        lambda w: f"{_and(w).capitalize()} written by hand on a light background.",
        lambda w: f"A picture showing the digit{s(w)}  {_and(w)}.",
        lambda w: (f"the sequence {', then '.join(w)} written by hand" if len(w) > 1
                   else f"the digit {w[0]} written by hand"),
        lambda w: f"{COUNT_WORDS[len(w)]} dark digit{s(w)} on a light background , {_and([_a(x) for x in w])} ",
        lambda w: (f"A handwritten {w[0]}, followed by {_and([_a(x) for x in w[1:]])}." if len(w) > 1
                   else f"A single handwritten {w[0]}."),
    )


def _layout(rng, n):
    """Cell sizes and positions for n digits: returns (width, height, boxes), boxes = [(x, y, w, h)] px.

    Digits are placed strictly left to right without overlap, so "left to right" captions are true.
    """
    # Cap the base size so that even n digits at the largest per-digit scale fit in the max width.
    cap = (WIDTH_RANGE[1] - 2 * MIN_MARGIN - (n - 1) * MIN_GAP) / (n * 1.15)
    base = rng.uniform(40, min(100, cap))
    hs = np.round(base * rng.uniform(0.85, 1.15, n)).astype(int)
    ws = np.maximum(np.round(hs * rng.uniform(0.85, 1.0, n)).astype(int), 8)  # slightly narrow cells, like handwriting
    needed_w = int(ws.sum()) + (n - 1) * MIN_GAP + 2 * MIN_MARGIN
    width = int(rng.integers(max(WIDTH_RANGE[0], needed_w), WIDTH_RANGE[1] + 1))
    height = int(rng.integers(max(HEIGHT_RANGE[0], int(hs.max()) + 2 * MIN_MARGIN), HEIGHT_RANGE[1] + 1))
    # Spread the spare width randomly over left margin, gaps and right margin (horizontal jitter).
    extra = np.floor(rng.dirichlet(np.ones(n + 1)) * (width - needed_w)).astype(int)
    boxes, x = [], MIN_MARGIN
    for i in range(n):
        x += int(extra[i])
        y = int(rng.integers(MIN_MARGIN, height - hs[i] - MIN_MARGIN + 1))
        boxes.append((x, y, int(ws[i]), int(hs[i])))
        x += int(ws[i]) + MIN_GAP
    return width, height, boxes


def _render(rng, samples, width, height, boxes):
    """Compose 8x8 digit samples (values 0..16) into an RGB uint8 array of shape (height, width, 3)."""
    ink = np.zeros((height, width), np.float32)  # ink coverage in [0, 1]
    for sample, (x, y, w, h) in zip(samples, boxes):
        small = Image.fromarray(np.uint8(np.round(sample * (255 / 16))), "L")
        resample = Image.Resampling.BICUBIC if rng.random() < 0.5 else Image.Resampling.BILINEAR
        cell = np.asarray(small.resize((w, h), resample), np.float32) / 255
        ink[y:y + h, x:x + w] = cell
    background = rng.uniform(190, 255, 3).astype(np.float32)
    colour = rng.uniform(0, 90, 3).astype(np.float32)
    # Luminance noise shared by the channels: a third of the cost of per-channel noise, and JPEG's
    # chroma subsampling would smear colour noise anyway. Per-channel 2-D ops avoid numpy's slow
    # broadcasting over a trailing axis of length 3.
    noise = rng.standard_normal((height, width), dtype=np.float32) * np.float32(rng.uniform(2, 10))
    img = np.empty((height, width, 3), np.uint8)
    for ch in range(3):
        plane = ink * (colour[ch] - background[ch])
        plane += background[ch] + noise
        img[..., ch] = np.clip(plane, 0, 255, out=plane)
    return img


def load_digits():
    """scikit-learn's bundled handwritten digits (imported lazily: scikit-learn takes a second to import)."""
    from sklearn.datasets import load_digits as load

    return load()


def sample_pools(rng: np.random.Generator, n_samples: int) -> dict[str, np.ndarray]:
    """Disjoint sample pools per split, so val/test never show a train sample: {split: indices}.
    Must be the first draw of the demo's generator (pipeline/digits/pretrain.py rebuilds the pools from the seed)."""
    perm = rng.permutation(n_samples)
    cut1 = int(POOL_FRACTIONS[0] * len(perm))
    cut2 = cut1 + int(POOL_FRACTIONS[1] * len(perm))
    return dict(zip(SPLITS, (perm[:cut1], perm[cut1:cut2], perm[cut2:])))


def render_scene(rng: np.random.Generator, digit_images, samples) -> tuple[np.ndarray, list[tuple]]:
    """One demo scene of the given digit samples (indices into digit_images (N, 8, 8)), left to right:
    → (RGB uint8 (height, width, 3), boxes [(x, y, w, h)] in pixels, same order)."""
    width, height, boxes = _layout(rng, len(samples))
    return _render(rng, digit_images[samples], width, height, boxes), boxes


def write_demo_dataset(outdir, train_images: int, val_images: int, test_images: int, seed: int,
                       progress=None) -> dict:
    """Write the demo dataset into `outdir` (an existing, empty directory). Returns a summary dict
    {"splits": {"train": n, "val": n, "test": n}, "captions": total, "grayscale_images": n, "seed": seed}.

    Writes outdir/{train,val,test}/digits_<split>_<id:012d>.jpg, outdir/captions_<split>.json (COCO
    captions format, plus per-image "digits" labels, "digit_boxes" [[x, y, w, h], ...] in pixels, left to
    right, and "digit_samples" indices into load_digits())
    and outdir/karpathy_split.json (format of Karpathy's dataset_coco.json). `progress(done, total)`
    is called after each image is written. Everything derives from numpy.random.default_rng(seed).
    """
    counts = {"train": int(train_images), "val": int(val_images), "test": int(test_images)}
    if min(counts.values()) < 0:
        raise ValueError(f"image counts must be >= 0, got {counts}")
    os.makedirs(outdir, exist_ok=True)
    if os.listdir(outdir):
        raise ValueError(f"{outdir} is not empty; refusing to mix demo datasets")
    rng = np.random.default_rng(seed)
    digits, templates = load_digits(), caption_templates()
    pools = sample_pools(rng, len(digits.target))
    # Sparse, sorted ids (like COCO's) so code that confuses ids with list indices fails loudly.
    total = sum(counts.values())
    ids = iter(np.sort(rng.choice(999_999, size=total, replace=False) + 1).tolist())

    karpathy, n_gray = [], 0
    for split in SPLITS:
        os.makedirs(os.path.join(outdir, split))
        # A deterministic number of grayscale images (>= 1 once a split has 10) so tests can rely on it.
        n_split_gray = max(round(GRAYSCALE_FRACTION * counts[split]), 1 if counts[split] >= 10 else 0)
        gray = set(rng.choice(counts[split], size=n_split_gray, replace=False).tolist()) if counts[split] else set()
        images, annotations = [], []
        for i in range(counts[split]):
            image, captions = _write_image(rng, outdir, split, next(ids), digits, templates, pools[split],
                                           i in gray)
            image_annotations, entry = _caption_entries(image, captions, split, imgid=len(karpathy))
            images.append(image)
            annotations += image_annotations
            karpathy.append(entry)
            n_gray += i in gray
            if progress is not None:
                progress(len(karpathy), total)
        write_json(os.path.join(outdir, f"captions_{split}.json"),
                   {"info": INFO, "licenses": LICENSES, "images": images, "annotations": annotations}, indent=None)
    write_json(os.path.join(outdir, "karpathy_split.json"), {"dataset": "digits", "images": karpathy}, indent=None)
    return {"splits": counts, "captions": total * CAPTIONS_PER_IMAGE, "grayscale_images": n_gray, "seed": seed}


def _write_image(rng, outdir, split: str, image_id: int, digits, templates, pool,
                 grayscale: bool) -> tuple[dict, list[str]]:
    """Render, save and caption one scene of 1–4 digits from `pool`: → (COCO image entry, its captions)."""
    samples = rng.choice(pool, size=int(rng.integers(1, 5))).tolist()
    labels = [int(digits.target[k]) for k in samples]
    pixels, boxes = render_scene(rng, digits.images, samples)
    height, width = pixels.shape[:2]
    img = Image.fromarray(pixels, "RGB")
    if grayscale:
        img = img.convert("L")
    file_name = f"digits_{split}_{image_id:012d}.jpg"
    img.save(os.path.join(outdir, split, file_name), "JPEG", quality=JPEG_QUALITY)
    words = [NUMBER_WORDS[d] for d in labels]
    captions = [templates[t](words) for t in rng.choice(len(templates), CAPTIONS_PER_IMAGE, replace=False)]
    return ({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1,
             "date_captured": DATE_CAPTURED, "digits": labels, "digit_boxes": [list(b) for b in boxes],
             "digit_samples": samples}, captions)


def _caption_entries(image: dict, captions: list[str], split: str, imgid: int) -> tuple[list[dict], dict]:
    """(COCO annotations, Karpathy-split entry) of the `imgid`-th image. Every image has CAPTIONS_PER_IMAGE
    captions, so sentence ids run on from imgid × CAPTIONS_PER_IMAGE and annotation ids are sentence ids + 1."""
    first = imgid * CAPTIONS_PER_IMAGE
    sentences = [{"raw": c, "tokens": re.findall(r"[a-z]+", c.lower()), "imgid": imgid, "sentid": first + k}
                 for k, c in enumerate(captions)]
    annotations = [{"id": s["sentid"] + 1, "image_id": image["id"], "caption": s["raw"]} for s in sentences]
    return annotations, {"cocoid": image["id"], "filepath": split, "filename": image["file_name"], "split": split,
                         "imgid": imgid, "sentids": [s["sentid"] for s in sentences], "sentences": sentences}
