import json
import os
import re

import pytest
from PIL import Image
from sklearn.datasets import load_digits


from pipeline.digits.demo import NUMBER_WORDS, caption_templates, write_demo_dataset

SPLITS = ("train", "val", "test")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _coco(root, split):
    with open(os.path.join(root, f"captions_{split}.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    calls = []
    summary = write_demo_dataset(str(root), 60, 10, 10, seed=7, progress=lambda d, t: calls.append((d, t)))
    return str(root), summary, calls


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a, b, c = (tmp_path / "a", tmp_path / "b", tmp_path / "c")
    for d in (a, b, c):
        d.mkdir()
    write_demo_dataset(str(a), 12, 4, 4, seed=1)
    write_demo_dataset(str(b), 12, 4, 4, seed=1)
    write_demo_dataset(str(c), 12, 4, 4, seed=2)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 20 + 4  # 20 images, 3 caption files, 1 karpathy file
    assert fa == fb
    assert _files(c)["captions_train.json"] != fa["captions_train.json"]


def test_summary_and_progress(dataset):
    _, summary, calls = dataset
    assert summary["splits"] == {"train": 60, "val": 10, "test": 10}
    assert summary["captions"] == 80 * 5
    assert summary["seed"] == 7
    assert calls == [(i, 80) for i in range(1, 81)]


def test_coco_schema_ids_and_images(dataset):
    root, summary, _ = dataset
    image_ids, ann_ids, sizes, n_gray = set(), set(), set(), 0
    for split in SPLITS:
        coco = _coco(root, split)
        assert set(coco) >= {"info", "licenses", "images", "annotations"}
        assert {"description", "version", "year", "date_created"} <= set(coco["info"])
        assert coco["licenses"][0]["id"] == 1 and {"name", "url"} <= set(coco["licenses"][0])
        assert len(coco["images"]) == summary["splits"][split]
        ids = {im["id"] for im in coco["images"]}
        assert len(ids) == len(coco["images"]) and not ids & image_ids
        image_ids |= ids
        per_image = {i: 0 for i in ids}
        for ann in coco["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"} and isinstance(ann["caption"], str)
            assert ann["id"] not in ann_ids
            ann_ids.add(ann["id"])
            per_image[ann["image_id"]] += 1  # KeyError if the image_id does not exist in this split
        assert set(per_image.values()) <= {5}
        for im in coco["images"]:
            assert {"id", "file_name", "width", "height", "license", "date_captured"} <= set(im)
            assert im["file_name"] == f"digits_{split}_{im['id']:012d}.jpg"
            with Image.open(os.path.join(root, split, im["file_name"])) as img:
                assert img.format == "JPEG"
                assert img.size == (im["width"], im["height"])
                assert img.mode in ("RGB", "L")
                n_gray += img.mode == "L"
            sizes.add((im["width"], im["height"]))
        assert sorted(os.listdir(os.path.join(root, split))) == sorted(im["file_name"] for im in coco["images"])
    assert len(sizes) > 1 and any(w != h for w, h in sizes) and any(w != 299 for w, _ in sizes)
    assert n_gray == summary["grayscale_images"] >= 3  # >= 1 per split of >= 10 images


def test_digit_pools_are_disjoint_and_labels_match(dataset):
    root, _, _ = dataset
    target = load_digits().target
    used = {}
    for split in SPLITS:
        used[split] = set()
        for im in _coco(root, split)["images"]:
            assert 1 <= len(im["digits"]) <= 4 and len(im["digit_samples"]) == len(im["digits"])
            assert [int(target[k]) for k in im["digit_samples"]] == im["digits"]
            used[split] |= set(im["digit_samples"])
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def _number_words(caption):
    tokens = re.sub(r"[^a-z ]", " ", caption.lower()).split()
    return [t for t in tokens if t in NUMBER_WORDS]


def _is_truthful(caption, digits):
    """The number words are exactly the digits in order, optionally preceded by the correct count."""
    words = [NUMBER_WORDS[d] for d in digits]
    found = _number_words(caption)
    return found == words or found == [COUNT_WORDS[len(digits)]] + words


def test_captions_are_truthful_and_varied(dataset):
    root, _, _ = dataset
    for split in SPLITS:
        coco = _coco(root, split)
        by_image = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann["caption"])
        for im in coco["images"]:
            caps = by_image[im["id"]]
            assert len(set(caps)) == 5
            for cap in caps:
                assert _is_truthful(cap, im["digits"]), (cap, im["digits"])
                assert not re.search(r"\d", cap)
                assert not re.search(r"\ba eight\b|\ban (?!eight|image)\w+", cap.lower()), cap
    # Messy surface forms that caption normalisation has to handle actually occur.
    caps = [a["caption"] for a in _coco(root, "train")["annotations"]]
    assert any(c.endswith(".") for c in caps) and any(c.endswith(" ") for c in caps)
    assert any("  " in c for c in caps) and any(c[0].isupper() for c in caps) and any(c[0].islower() for c in caps)


@pytest.mark.parametrize("digits", [[7], [8], [7, 2], [8, 0], [7, 2, 9], [1, 8, 8, 3], [0, 0, 0, 0]])
def test_every_template_is_truthful_for_1_to_4_digits(digits):
    templates = caption_templates()
    assert len(templates) >= 8
    words = [NUMBER_WORDS[d] for d in digits]
    captions = [t(words) for t in templates]
    assert len(set(captions)) == len(captions)
    for cap in captions:
        assert _is_truthful(cap, digits), cap
        assert "a eight" not in cap.lower()


def test_karpathy_split_covers_every_image_once(dataset):
    root, _, _ = dataset
    with open(os.path.join(root, "karpathy_split.json"), encoding="utf-8") as f:
        karpathy = json.load(f)
    assert karpathy["dataset"] == "digits"
    entries = {e["cocoid"]: e for e in karpathy["images"]}
    assert len(entries) == len(karpathy["images"])
    assert [e["imgid"] for e in karpathy["images"]] == list(range(len(karpathy["images"])))
    sentids = [s["sentid"] for e in karpathy["images"] for s in e["sentences"]]
    assert len(set(sentids)) == len(sentids)
    n = 0
    for split in SPLITS:
        coco = _coco(root, split)
        captions = {}
        for ann in coco["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
        for im in coco["images"]:
            e = entries[im["id"]]
            n += 1
            assert e["split"] == e["filepath"] == split and e["filename"] == im["file_name"]
            assert [s["raw"] for s in e["sentences"]] == captions[im["id"]]
            assert e["sentids"] == [s["sentid"] for s in e["sentences"]]
            for s in e["sentences"]:
                assert s["imgid"] == e["imgid"]
                assert s["tokens"] and all(t == t.lower() and t.isalpha() for t in s["tokens"])
    assert n == len(entries)


def test_refuses_non_empty_outdir(tmp_path):
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(ValueError):
        write_demo_dataset(str(tmp_path), 2, 1, 1, seed=0)
