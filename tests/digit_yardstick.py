"""An independent digit-scene yardstick in COCO 2017 form, rendered from a specification rather than by
pipeline/digits/demo.py's renderer:

    .venv/bin/python -m tests.digit_yardstick OUTDIR [--train 1200 --val 100 --test 200 --seed 5]
    .venv/bin/python -m tests.digit_yardstick OUTDIR --ceiling   # BLEU-4 with every digit right, by phrasing
    .venv/bin/python -m tests.digit_yardstick OUTDIR --encoder-reads WORKSPACE/features/<fp>   # the encoder alone
        [--captions WORKSPACE/captions/<fp>/test.json]   # ... and the captions, image by image

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

Rendering: pipeline/digits/yardstick.py (the pretraining report measures its encoder on these scenes too).

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
import json
import os
import sys

import numpy as np
from PIL import Image

from pipeline.digits import demo
from pipeline.captions import tokenize
from pipeline.digits.metrics import digit_sequence
from pipeline.digits.yardstick import LUMA, inked_columns, render

DEMO_SEED = 1797        # [demo] seed: the pools the digits encoder was pretrained from
SPLITS = ("train", "val", "test")
FOLDER = {"train": "train2017", "val": "val2017", "test": "val2017"}
CAPTIONS_PER_IMAGE = 5
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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
                glyphs = [w * inked_columns(digits.images[k]) / 8 / h for k, (_, _, w, h) in zip(samples, boxes)]
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


# ----------------------------------------------------------------------------------------------- ceiling

def _splits(root) -> dict[int, str]:
    """{image id: its split} of OUTDIR's Karpathy split file."""
    with open(os.path.join(root, "dataset_coco.json"), encoding="utf-8") as f:
        return {image["cocoid"]: image["split"] for image in json.load(f)["images"]}


def ceiling(root) -> str:
    """What a decoder that reads every digit of the test split right reaches in each single phrasing: corpus
    BLEU-4 and CIDEr-D (pipeline.evaluate.evaluate) of the test images captioned in that phrasing against their
    five references. A decoder cannot know which five of the ten phrasings an image's references use, so the
    best of these bounds what it can expect."""
    from pipeline.evaluate import evaluate

    test = {image_id for image_id, split in _splits(root).items() if split == "test"}
    with open(os.path.join(root, "annotations", "captions_val2017.json"), encoding="utf-8") as f:
        data = json.load(f)
    digits = {image["id"]: image["digits"] for image in data["images"] if image["id"] in test}
    references = {}
    for annotation in data["annotations"]:
        if annotation["image_id"] in digits:
            references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    lines = [f"{len(references)} test images, every digit right, one phrasing each:"]
    for form in phrasings():
        hypotheses = {i: form([NUMBER_WORDS[d] for d in digits[i]]) for i in references}
        corpus = evaluate(references, hypotheses)["corpus"]
        lines.append(f"  BLEU-4 {corpus['Bleu_4']:.3f}  CIDEr-D {corpus['CIDEr']:.3f}  "
                     f"e.g. {hypotheses[next(iter(hypotheses))]!r}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ encoder reads

def encoder_reads(root, store, captions=None) -> str:
    """What the encoder alone reads of each split of OUTDIR, from the cell scores a feature store holds for its
    images (a store of `[encoder] layer = <layer>+cell_scores`, or of the digits encoder's plain layer, whose cell
    head next to its weights file then scores the stored features; rows found by the images' content keys): each
    digit as pipeline.digits.scenes.read_digit reads it given its box, the share of digits and of images with
    every digit right (about as many as a decoder can caption exactly: it reads the base layer's channels too),
    by digit height (box height / image height, in tenths); and, for how hard the split's glyphs are in
    themselves, the share of its digits an SVM on the raw 8×8 samples reads (scikit-learn's SVC, trained on the
    demo's train pool). With `captions` (a split's captions file, captions/<fp>/<split>.json): how many of the
    images the encoder reads wholly, and of those it does not, the captions read exactly."""
    from sklearn.svm import SVC

    from pipeline.digits.cell_scores import CHANNELS, CLASSES
    from pipeline.digits.scenes import pools as demo_pools, read_digit
    from pipeline.encoder import base_layer, grid_side
    from storage.contents import bytes_sha256
    from storage.shards import list_shards, read_attrs, read_contents, read_rows
    from storage.weights import CELL_HEAD_FILE, read_cell_head

    split_of = _splits(root)
    images = {}
    for folder in ("train2017", "val2017"):
        with open(os.path.join(root, "annotations", f"captions_{folder}.json"), encoding="utf-8") as f:
            for image in json.load(f)["images"]:
                images[image["id"]] = (os.path.join(root, folder, image["file_name"]), image)
    keys = {bytes_sha256(path): image_id for image_id, (path, _) in images.items()}
    scores, layer, size = {}, None, 0
    for shard in list_shards(store):
        attrs = read_attrs(shard)
        head = os.path.join(os.path.dirname(str(attrs.get("weights_path", ""))), CELL_HEAD_FILE)
        if not str(attrs.get("layer", "")).endswith("+cell_scores") and not os.path.exists(head):
            raise SystemExit(f"{shard}: layer {attrs.get('layer')!r} has no cell scores, and no cell head lies "
                             "beside its weights; give the store of an `[encoder] layer = <layer>+cell_scores` "
                             "extraction, or one made with `weights = digits`")
        layer, size = base_layer(attrs["layer"]), int(attrs["image_size"])
        rows = [(k, keys[c]) for k, c in enumerate(read_contents(shard)) if c in keys]
        if rows:
            features = read_rows(shard, 0, rows[-1][0] + 1).astype(np.float32)
            if str(attrs["layer"]).endswith("+cell_scores"):
                probabilities = features[..., -CHANNELS:][..., :CLASSES]
            else:   # the head's logits → the probabilities the cell scores would hold
                kernel, bias, _ = read_cell_head(head)
                logits = features @ kernel[:, :CLASSES] + bias[:CLASSES]
                probabilities = np.exp(logits - logits.max(-1, keepdims=True))
                probabilities /= probabilities.sum(-1, keepdims=True)
            for k, image_id in rows:
                scores[image_id] = probabilities[k]
    digits = demo.load_digits()
    samples = digits.images.reshape(len(digits.target), -1)
    train_pool = demo_pools(DEMO_SEED)["train"]
    svm = SVC(gamma=0.001).fit(samples[train_pool], digits.target[train_pool])
    lines = [f"{len(scores)} of {len(images)} images found in {store}"]
    wholly = {}
    for split in SPLITS:
        read, scenes, by_height, glyphs = [], [], {}, []
        for image_id in (i for i in scores if split_of.get(i) == split):
            _, image = images[image_id]
            glyphs += image["digit_samples"]
            side = grid_side(len(scores[image_id]))
            logits = np.log(scores[image_id].reshape(side, side, CLASSES) + 1e-6)
            sx, sy = size / image["width"], size / image["height"]
            right = [read_digit(logits, (x * sx, y * sy, w * sx, h * sy), layer) == label
                     for (x, y, w, h), label in zip(image["digit_boxes"], image["digits"])]
            for (_, _, _, h), ok in zip(image["digit_boxes"], right):
                by_height.setdefault(min(int(10 * h / image["height"]), 9), []).append(ok)
            read += right
            scenes.append(all(right))
            wholly[image_id] = all(right)
        if scenes:
            bands = "  ".join(f"0.{b}: {np.mean(oks):.2f} of {len(oks)}" for b, oks in sorted(by_height.items()))
            svm_reads = np.mean(svm.predict(samples[glyphs]) == digits.target[glyphs])
            lines.append(f"{split:5s}  {len(scenes)} images: digits {np.mean(read):.3f}, images wholly "
                         f"{np.mean(scenes):.3f}; the 8x8 samples an SVM reads: {svm_reads:.3f}")
            lines.append(f"       by digit height  {bands}")
    if captions:
        with open(captions, encoding="utf-8") as f:
            exact = {c["image_id"]: digit_sequence(c["caption"]) == images[c["image_id"]][1]["digits"]
                     for c in json.load(f) if c["image_id"] in wholly}
        for read_wholly, what in ((True, "reads wholly"), (False, "misreads")):
            ids = [i for i in exact if wholly[i] == read_wholly]
            lines.append(f"{captions}: of the {len(ids)} images the encoder {what}, the captions read "
                         f"{sum(exact[i] for i in ids)} exactly")
    return "\n".join(lines)


def cell_positions(store, fit: int = 400, read: int = 200) -> str:
    """How plainly a feature store's cells say where they lie: a ridge probe (λ = 10, channels standardised) of
    each cell's row and column from its channels, fit on the cells of the first `fit` train-shard rows and read
    on those of the first `read` test-shard rows: R² of the row and of the column, and the share of cells it
    places exactly (both rounded to the grid)."""
    from storage.shards import list_shards, read_attrs, read_rows

    def cells(split, n):
        rows = []
        for shard in (s for s in list_shards(store) if read_attrs(s).get("split") == split):
            rows.append(read_rows(shard, 0, min(n - sum(map(len, rows)), int(read_attrs(shard)["n_rows"]))))
            if sum(map(len, rows)) >= n:
                break
        x = np.concatenate(rows).astype(np.float32)
        side = int(round(x.shape[1] ** 0.5))
        where = np.stack(np.divmod(np.arange(x.shape[1]), side), axis=1).astype(np.float32)
        return x.reshape(-1, x.shape[2]), np.tile(where, (len(x), 1)), len(x)

    x, y, n_fit = cells("train", fit)
    xt, yt, n_read = cells("test", read)
    mean, std = x.mean(0), x.std(0) + 1e-3
    x, xt = np.c_[(x - mean) / std, np.ones(len(x))], np.c_[(xt - mean) / std, np.ones(len(xt))]
    weights = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ y)
    guess = xt @ weights
    r2 = 1 - ((guess - yt) ** 2).sum(0) / ((yt - yt.mean(0)) ** 2).sum(0)
    exact = np.mean(np.all(np.rint(guess) == yt, axis=1))
    return (f"{store}: fit on {n_fit} train images' cells, read on {n_read} test images': R² row {r2[0]:.3f}, "
            f"column {r2[1]:.3f}; cells placed exactly {exact:.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", help="output directory (created; must be empty)")
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--probe", type=int, metavar="N",
                        help="instead: print distributions of N scenes of the demo's renderer and of this one")
    parser.add_argument("--ceiling", action="store_true",
                        help="instead: BLEU-4 and CIDEr-D of OUTDIR's test split captioned with every digit right, "
                             "in each phrasing")
    parser.add_argument("--encoder-reads", metavar="STORE",
                        help="instead: what the encoder alone reads of OUTDIR's splits, from the cell scores of a "
                             "feature store (WORKSPACE/features/<fingerprint>) that holds its images")
    parser.add_argument("--captions", metavar="FILE",
                        help="with --encoder-reads: a split's captions (captions/<fp>/<split>.json), set against "
                             "what the encoder alone reads of its images")
    parser.add_argument("--cell-positions", metavar="STORE",
                        help="instead: how plainly a feature store's cells say where they lie (a linear probe)")
    args = parser.parse_args(argv)
    if args.cell_positions:
        print(cell_positions(args.cell_positions))
        return
    if args.encoder_reads:
        print(encoder_reads(args.outdir, args.encoder_reads, args.captions))
        return
    if args.ceiling:
        print(ceiling(args.outdir))
        return
    if args.probe:
        print(probe(args.probe))
        return
    if not args.outdir:
        parser.error("OUTDIR is required (or --probe N)")
    print(write_yardstick(args.outdir, args.train, args.val, args.test, args.seed))


if __name__ == "__main__":
    main(sys.argv[1:])
