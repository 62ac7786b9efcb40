"""The digit yardstick (tests/digit_yardstick.py): captions, boxes, ranges, files, determinism."""
import itertools
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.digits import demo
from pipeline.annotations import extract_annotations
from pipeline.captions import normalize_caption, tokenize
from pipeline.digits import yardstick
from pipeline.digits.metrics import digit_sequence
from tests import coco2017_digits
from tests import digit_yardstick as ys

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
COUNTS = {"train": 40, "val": 5, "test": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("yardstick") / "ds"
    ys.main([str(out), "--train", "40", "--val", "5", "--test", "5", "--seed", "3"])
    coco = {}
    for folder in ("train2017", "val2017"):
        with open(out / "annotations" / f"captions_{folder}.json", encoding="utf-8") as f:
            coco[folder] = json.load(f)
    with open(out / "dataset_coco.json", encoding="utf-8") as f:
        split = json.load(f)
    images = []   # (folder, image entry, captions, luminance (H, W), RGB float (H, W, 3))
    for folder, d in coco.items():
        captions = {}
        for a in d["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"])
        for im in d["images"]:
            rgb = np.asarray(Image.open(out / folder / im["file_name"]).convert("RGB"), np.float32)
            images.append((folder, im, captions[im["id"]], rgb @ LUMA, rgb))
    return out, coco, split, images


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return out


def _mask(shape, boxes, grow=0):
    mask = np.zeros(shape, bool)
    for x, y, w, h in boxes:
        mask[max(y - grow, 0):y + h + grow, max(x - grow, 0):x + w + grow] = True
    return mask


def test_every_phrasing_names_exactly_the_digits_and_none_is_the_demos():
    rng = np.random.default_rng(0)
    sequences = [list(s) for n in (1, 2) for s in itertools.product(range(10), repeat=n)]
    sequences += [rng.integers(0, 10, n).tolist() for n in (3, 4) for _ in range(300)]
    others = [*demo.caption_templates(), coco2017_digits.forms]
    for labels in sequences:
        words = [ys.NUMBER_WORDS[d] for d in labels]
        ours = [form(words) for form in ys.phrasings()]
        assert len({normalize_caption(c) for c in ours}) == len(ours)
        theirs = {normalize_caption(c) for other in others
                  for c in (other(words) if other is coco2017_digits.forms else [other(words)])}
        for caption in ours:
            assert digit_sequence(caption) == labels, caption
            assert not re.search(r"\d", caption), caption
            assert normalize_caption(caption) not in theirs, caption


def test_captions_name_exactly_the_labels(data):
    _, _, _, images = data
    for _, im, captions, _, _ in images:
        assert len(captions) == ys.CAPTIONS_PER_IMAGE == len(set(captions))
        for caption in captions:
            assert digit_sequence(caption) == im["digits"], caption


def test_boxes_inside_ordered_left_to_right_and_apart(data):
    _, _, _, images = data
    for _, im, _, lum, _ in images:
        boxes = im["digit_boxes"]
        assert len(boxes) == len(im["digits"]) == len(im["digit_samples"])
        assert lum.shape == (im["height"], im["width"])
        for x, y, w, h in boxes:
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= im["width"] and y + h <= im["height"]
        centres = [x + w / 2 for x, _, w, _ in boxes]
        assert centres == sorted(centres) and len(set(centres)) == len(centres)
        for (ax, ay, aw, ah), (bx, by, bw, bh) in itertools.combinations(boxes, 2):
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, (im["id"], boxes)


def test_boxes_cover_the_ink(data):
    _, _, _, images = data
    for _, im, _, lum, _ in images:
        boxes = im["digit_boxes"]
        union = _mask(lum.shape, boxes)
        darkest = np.argsort(lum, axis=None)[:20]
        assert union.flat[darkest].all(), im["id"]   # the 20 darkest pixels of the image are ink
        for x, y, w, h in boxes:
            grow = max(4, h // 4)
            ring = _mask(lum.shape, [(x, y, w, h)], grow) & ~union
            assert np.percentile(lum[y:y + h, x:x + w], 5) < np.median(lum[ring]) - 25, (im["id"], (x, y, w, h))


def test_sizes_aspects_backgrounds_and_inks_span_the_specified_ranges(data):
    _, _, _, images = data
    aspects, fractions, glyphs, backgrounds, inks, counts = [], [], [], [], [], set()
    for _, im, _, lum, rgb in images:
        width, height = im["width"], im["height"]
        assert yardstick.HEIGHT_RANGE[0] <= height <= yardstick.HEIGHT_RANGE[1] and width <= yardstick.MAX_WIDTH
        aspects.append(width / height)
        fractions += [h / height for *_, h in im["digit_boxes"]]
        glyphs += [w / h for *_, w, h in im["digit_boxes"]]
        union = _mask(lum.shape, im["digit_boxes"])
        backgrounds.append(float(np.median(lum[~union])))
        core = lum[union] <= np.percentile(lum[union], 2)
        inks.append(rgb[union][core].mean(0))
        counts.add(len(im["digits"]))
    assert len(images) == sum(COUNTS.values()) and counts == {1, 2, 3, 4}
    assert 0.5 <= min(aspects) < 0.8 and 2.0 < max(aspects) <= 3.0
    assert 0.1 <= min(fractions) < 0.2 and 0.6 < max(fractions) <= 0.85
    assert min(glyphs) < 0.5 and max(glyphs) > 0.8
    assert 115 <= min(backgrounds) < 170 and 215 < max(backgrounds) <= 255
    inks = np.array(inks)
    assert (inks @ LUMA).max() < 120
    coloured = inks[np.ptp(inks, axis=1) > 15]
    assert set(np.argmax(coloured, axis=1).tolist()) == {0, 1, 2}   # reddish, greenish and bluish inks


def test_split_file_and_coco_files_agree(data, digits_plugin):
    out, coco, split, images = data
    entries = split["images"]
    assert {s: sum(e["split"] == s for e in entries) for s in ys.SPLITS} == COUNTS
    by_id = {im["id"]: (folder, im) for folder, im, *_ in images}
    assert len(by_id) == len(entries) == len({e["cocoid"] for e in entries})
    annotations = {a["id"]: a for d in coco.values() for a in d["annotations"]}
    assert len(annotations) == sum(len(d["annotations"]) for d in coco.values())
    for e in entries:
        folder, im = by_id[e["cocoid"]]
        assert e["filepath"] == folder == ("train2017" if e["split"] == "train" else "val2017")
        assert e["filename"] == im["file_name"] == f"{im['id']:012d}.jpg"
        with Image.open(out / folder / e["filename"]) as img:
            assert img.size == (im["width"], im["height"])
        assert len(e["sentences"]) == ys.CAPTIONS_PER_IMAGE
        for s in e["sentences"]:
            assert annotations[s["sentid"]]["image_id"] == im["id"]
            assert annotations[s["sentid"]]["caption"] == s["raw"]
            assert s["tokens"] == tokenize(s["raw"])
    splits, report = extract_annotations(
        [out / "annotations" / f"captions_{f}.json" for f in ("train2017", "val2017")],
        [out / f for f in ("train2017", "val2017")], karpathy_split=out / "dataset_coco.json")
    assert not any(report["problem_counts"].values())
    assert {s: len(r) for s, r in splits.items()} == COUNTS
    assert all(r["digits"] and len(r["digit_boxes"]) == len(r["digits"]) for rs in splits.values() for r in rs)


def test_digit_samples_come_from_the_demos_val_and_test_pools_only(data):
    _, _, split, images = data
    digits = demo.load_digits()
    demo_pools = demo.sample_pools(np.random.default_rng(1797), len(digits.target))
    ours = ys.pools()
    assert not set(np.concatenate(list(ours.values())).tolist()) & set(demo_pools["train"].tolist())
    for a, b in itertools.combinations(ys.SPLITS, 2):
        assert not set(ours[a].tolist()) & set(ours[b].tolist())
    split_of = {e["cocoid"]: e["split"] for e in split["images"]}
    for _, im, *_ in images:
        assert set(im["digit_samples"]) <= set(ours[split_of[im["id"]]].tolist())
        assert im["digits"] == [int(digits.target[k]) for k in im["digit_samples"]]


def test_a_fixed_seed_gives_identical_bytes(tmp_path):
    for name, seed in (("a", 9), ("b", 9), ("c", 10)):
        ys.write_yardstick(tmp_path / name, 4, 1, 1, seed=seed)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == 6 + 3 and a == b
    assert c["dataset_coco.json"] != a["dataset_coco.json"]
    with pytest.raises(ValueError, match="not empty"):
        ys.write_yardstick(tmp_path / "a", 1, 1, 1)


def _cell_score_store(store, root, images, misread_split, head=False):
    """A store of `mixed7+cell_scores` rows for the yardstick's images (one base channel, 11 class scores, the
    centre score), their class scores one-hot on the digit each cell lies in (pipeline.digits.scenes.scene_labels),
    every digit cell one digit off in `misread_split`, their centre scores 1 everywhere (not read). head: a plain
    `mixed7` store of the same channels instead, with a cell head beside its weights_path that scores them so."""
    from pipeline.digits.scenes import scene_labels
    from storage.contents import bytes_sha256
    from storage.shards import ShardWriter

    with open(os.path.join(root, "dataset_coco.json"), encoding="utf-8") as f:
        split_of = {image["cocoid"]: image["split"] for image in json.load(f)["images"]}
    attrs = {"layer": "mixed7+cell_scores", "image_size": 299}
    if head:
        from storage.weights import CELL_HEAD_FILE, write_cell_head
        attrs = {"layer": "mixed7", "image_size": 299, "weights_path": str(store / "inception_v3_digits.weights.h5")}
        write_cell_head(store / CELL_HEAD_FILE, 10 * np.eye(13, 12, -1), np.zeros(12), "mixed7", [""] * 12)
    with ShardWriter(store / "shard-plan-all-00000.h5", positions=289, channels=13, attrs=attrs) as shard:
        for folder, im, *_ in images:
            sx, sy = 299 / im["width"], 299 / im["height"]
            boxes = [(x * sx, y * sy, w * sx, h * sy, d) for (x, y, w, h), d in zip(im["digit_boxes"], im["digits"])]
            labels = scene_labels(boxes, 299, "mixed7")
            if split_of[im["id"]] == misread_split:
                labels = np.where(labels < 10, (labels + 1) % 10, labels)
            features = np.zeros((1, 289, 13), np.float32)
            features[0, np.arange(289), 1 + labels.reshape(-1)] = 1.0
            features[0, :, 12] = 1.0
            path = os.path.join(root, folder, im["file_name"])
            shard.append([bytes_sha256(path)], [im["id"]], [path], features)


def test_encoder_reads_the_digits_the_cell_scores_name(data, tmp_path):
    """--encoder-reads: per split, the share of digits (and of images wholly) the stored cell scores read right
    given the boxes, found by content key."""
    out, _, _, images = data
    store = tmp_path / "store"
    store.mkdir()
    _cell_score_store(store, out, images, misread_split="test")
    report = ys.encoder_reads(str(out), store).splitlines()
    assert report[0].startswith(f"{len(images)} of {len(images)} images found")
    found = {line.split()[0]: line for line in report[1:] if not line.startswith(" ")}
    assert f"{COUNTS['train']} images: digits 1.000, images wholly 1.000" in found["train"]
    assert f"{COUNTS['val']} images: digits 1.000, images wholly 1.000" in found["val"]
    assert f"{COUNTS['test']} images: digits 0.000, images wholly 0.000" in found["test"]


def test_encoder_reads_a_plain_store_through_the_cell_head_and_sets_captions_against_it(data, tmp_path):
    """--encoder-reads on a store of the digits encoder's plain layer scores it with the cell head beside the
    weights, as the cell scores would; --captions counts the captions read exactly among the images the encoder
    reads wholly and among those it misreads."""
    out, _, split, images = data
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    for store, head in ((plain, True), (scored, False)):
        store.mkdir()
        _cell_score_store(store, out, images, misread_split="test", head=head)
    assert ys.encoder_reads(str(out), plain).splitlines()[1:] == ys.encoder_reads(str(out), scored).splitlines()[1:]
    by_split = {image["cocoid"]: image["split"] for image in split["images"]}
    words = "zero one two three four five six seven eight nine".split()
    captions = tmp_path / "test.json"
    right = [im for _, im, *_ in images][::2]   # exact captions for every other image
    captions.write_text(json.dumps([{"image_id": im["id"], "caption": " ".join(words[d] for d in im["digits"])}
                                    for im in right] + [{"image_id": im["id"], "caption": "nothing"}
                                                        for _, im, *_ in images if im not in right]))
    report = ys.encoder_reads(str(out), plain, captions).splitlines()
    wholly = sum(by_split[im["id"]] != "test" for _, im, *_ in images)
    assert report[-2].endswith(f"of the {wholly} images the encoder reads wholly, the captions read "
                               f"{sum(by_split[im['id']] != 'test' for im in right)} exactly")
    assert report[-1].endswith(f"of the {len(images) - wholly} images the encoder misreads, the captions read "
                               f"{sum(by_split[im['id']] == 'test' for im in right)} exactly")


def test_cell_positions_probe_places_cells_whose_channels_say_where_they_lie(tmp_path):
    """--cell-positions: features with a row and a column channel are placed exactly; features of noise alone
    are not."""
    from storage.shards import ShardWriter
    rng = np.random.default_rng(0)
    where = np.stack(np.divmod(np.arange(64), 8), axis=1).astype(np.float32)
    for name, say in (("plain", True), ("noise", False)):
        store = tmp_path / name
        store.mkdir()
        for split, n in (("train", 40), ("test", 20)):
            with ShardWriter(store / f"shard-p-{split}-00000.h5", positions=64, channels=6,
                             attrs={"split": split}) as shard:
                features = rng.normal(size=(n, 64, 6)).astype(np.float32)
                if say:
                    features[:, :, :2] = where
                shard.append([f"{split}{i}" for i in range(n)], list(range(n)), [f"{i}.jpg" for i in range(n)],
                             features)
        line = ys.cell_positions(store)
        placed = float(line.rsplit(" ", 1)[1])
        assert "fit on 40 train images' cells, read on 20 test images'" in line
        assert (placed == 1.0) if say else (placed < 0.2), line
