"""Stage 1: caption normalisation, COCO parsing (2014 and 2017 naming), problems, splits."""
import json

import pytest

from pipeline.annotations import PROBLEM_KINDS, extract_annotations, make_annotations
from pipeline.captions import normalize_caption
from pipeline.coco_files import load_coco_captions
from pipeline.splits import split_by_fraction, split_changes
from pipeline.errors import InputError
from storage import manifests
from tests.conftest import captioner_log


@pytest.mark.parametrize("raw, expected", [
    ("A man riding a horse.", "a man riding a horse"),
    ("  Three handwritten digits: seven, two and nine. ", "three handwritten digits seven two and nine"),
    ("a seven, a two and a nine from left-to-right", "a seven a two and a nine from left to right"),
    ("The man's hat\tand the dogs' bowls", "the man's hat and the dogs bowls"),
    ("It\u2019s a CAFÉ!!", "it's a café"),
    ("ﬁsh  &  chips", "fish chips"),                 # NFKC ligature
    ("'quoted' words_with_underscores", "quoted words with underscores"),
    ("...", ""),
])
def test_normalize_caption(raw, expected):
    assert normalize_caption(raw) == expected


def write_coco(path, images, annotations):
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return path


def make_images(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"not decoded at this stage")


def test_coco_2014_and_2017_naming_uses_file_name(tmp_path):
    """Paths come from images[].file_name, never from ids: 2014 and 2017 style names both work."""
    names14 = {391895: "COCO_val2014_000000391895.jpg", 522418: "COCO_val2014_000000522418.jpg"}
    names17 = {139: "000000000139.jpg", 285: "000000000285.jpg"}
    make_images(tmp_path / "val2014", names14.values())
    make_images(tmp_path / "val2017", names17.values())
    f14 = write_coco(tmp_path / "captions_val2014.json",
                     [{"id": i, "file_name": n, "width": 640, "height": 480} for i, n in names14.items()],
                     [{"id": k, "image_id": i, "caption": f"Caption {k}."} for k, i in enumerate(names14)])
    f17 = write_coco(tmp_path / "captions_val2017.json",
                     [{"id": i, "file_name": n} for i, n in names17.items()],
                     [{"id": 100 + k, "image_id": i, "caption": "A cat."} for k, i in enumerate(names17)])
    splits, report = extract_annotations([f14, f17], [tmp_path / "val2014", tmp_path / "val2017"],
                                         val_fraction=0.0, test_fraction=0.0, seed=0)
    records = {r["image_id"]: r for r in splits["train"]}
    assert set(records) == set(names14) | set(names17)
    assert records[391895]["path"] == names14[391895]
    assert records[391895]["root"] == str((tmp_path / "val2014").resolve())
    assert records[139]["path"] == "000000000139.jpg"
    assert records[139]["root"] == str((tmp_path / "val2017").resolve())
    assert records[391895]["captions"] == ["caption 0"]
    assert records[391895]["raw_captions"] == ["Caption 0."]
    assert report["problem_counts"] == {kind: 0 for kind in PROBLEM_KINDS}


def test_every_problem_kind_is_counted_listed_and_skipped(tmp_path):
    make_images(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "f.jpg"])   # d.jpg is missing
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"},
              {"id": 4, "file_name": "d.jpg"}, {"id": 5, "file_name": "e.jpg"},
              {"id": 1, "file_name": "f.jpg"},                                       # duplicate image id
              {"id": 6}]                                                             # malformed image
    anns = [{"id": 10, "image_id": 1, "caption": "A dog."},
            {"id": 11, "image_id": 1, "caption": " ?! "},                           # empty after normalising
            {"id": 12, "image_id": 99, "caption": "Unknown image."},                # unknown image id
            {"id": 13, "image_id": 2, "caption": "A bird."},
            {"id": 13, "image_id": 2, "caption": "Duplicate caption id."},          # duplicate caption id
            {"id": 14, "image_id": 4, "caption": "Missing file."},
            {"id": 15, "image_id": 5, "caption": "Not in the split."},
            {"id": 16, "image_id": 1, "caption": None},                             # caption not a string
            {"id": 17, "image_id": None, "caption": "No image."}]                   # malformed annotation
    # image 3 has no caption at all
    f = write_coco(tmp_path / "captions.json", images, anns)
    split = tmp_path / "dataset_coco.json"
    split.write_text(json.dumps({"images": [{"cocoid": 1, "split": "train"}, {"cocoid": 2, "split": "restval"},
                                            {"cocoid": 3, "split": "val"}, {"cocoid": 4, "split": "test"}]}))
    splits, report = extract_annotations([f], [tmp_path / "imgs"], karpathy_split=split)
    assert report["problem_counts"] == {
        "malformed_image": 1, "malformed_image_field": 0, "malformed_annotation": 1, "caption_not_a_string": 1,
        "caption_for_unknown_image": 1,
        "image_without_captions": 1, "missing_image_file": 1, "image_outside_root": 0, "empty_caption": 1,
        "duplicate_image_id": 1, "duplicate_caption_id": 1, "image_not_in_split": 1, "split_file_conflict": 0}
    assert report["problems"]["missing_image_file"][0]["path"] == "d.jpg"
    assert report["problems"]["caption_for_unknown_image"][0]["image_id"] == 99
    assert report["problems"]["image_without_captions"][0]["image_id"] == 3
    assert report["problems"]["image_not_in_split"][0]["image_id"] == 5
    # what is left is exactly the good data: restval counts as train
    assert [(r["image_id"], r["path"], r["captions"]) for r in splits["train"]] == \
        [(1, "a.jpg", ["a dog"]), (2, "b.jpg", ["a bird"])]
    assert splits["val"] == [] and splits["test"] == []


def test_a_malformed_plug_in_field_is_reported_and_dropped_and_the_image_kept(tmp_path, digits_plugin):
    """The digits plug-in's fields: well-formed ones are kept; `digits` that are not integers 0–9, boxes that
    are not one per digit, and boxes without the image's width and height are listed as malformed_image_field
    and dropped (never kept half-read), while the image and its captions stay."""
    make_images(tmp_path / "imgs", [f"{i}.jpg" for i in range(1, 6)])
    good = {"digits": [7, 2], "digit_boxes": [[1, 2, 10, 20], [15, 2, 10, 20]], "width": 40, "height": 30}
    images = [{"id": 1, "file_name": "1.jpg", **good},
              {"id": 2, "file_name": "2.jpg", **good, "digits": ["7", "2"]},
              {"id": 3, "file_name": "3.jpg", **good, "digit_boxes": [[1, 2, 10, 20]]},
              {"id": 4, "file_name": "4.jpg", **{k: v for k, v in good.items() if k != "width"}},
              {"id": 5, "file_name": "5.jpg"}]                                   # no digit fields: nothing to say
    f = write_coco(tmp_path / "captions.json", images,
                   [{"id": 10 + i, "image_id": i, "caption": "Two digits."} for i in range(1, 6)])
    splits, report = extract_annotations([f], [tmp_path / "imgs"], val_fraction=0.0, test_fraction=0.0, seed=0)
    assert report["problem_counts"]["malformed_image_field"] == 3
    reasons = {p["image_id"]: p["reason"] for p in report["problems"]["malformed_image_field"]}
    assert "'digits' is not a list of integers 0-9" in reasons[2]
    assert "one [x, y, w, h] per digit" in reasons[3] and "'width' and 'height'" in reasons[4]
    records = {r["image_id"]: r for r in splits["train"]}
    assert set(records) == {1, 2, 3, 4, 5}
    assert records[1]["digit_boxes"] == good["digit_boxes"] and records[1]["width"] == 40
    assert "digits" not in records[2] and "digits" not in records[5]
    assert [(records[i]["digits"], "digit_boxes" in records[i]) for i in (3, 4)] == [([7, 2], False)] * 2


@pytest.mark.parametrize("content, needle", [
    (b"{not json", "not valid JSON"),
    (b'{"images": [], "annotations": [\xff]}', "not UTF-8"),
    (b'{"images": []}', "missing key 'annotations'"),
    (b'{"images": {}, "annotations": []}', "images: expected a list"),
    (b'{"images": [], "annotations": {"0": {}}}', "annotations: expected a list"),
    (b'[1, 2]', "top level"),
])
def test_malformed_file_names_file_and_field(tmp_path, content, needle):
    path = tmp_path / "captions_bad.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_coco_captions(path)
    assert str(path) in str(e.value) and needle in str(e.value) and "Fix:" in str(e.value)


def test_malformed_entries_are_skipped_and_reported_per_kind(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": "7", "file_name": "b.jpg"}, {"id": 8}, "nope",
                   {"id": True, "file_name": "c.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}, {"id": 2, "image_id": 1, "caption": None},
                        {"id": 3, "image_id": 1, "caption": 5}, {"id": 4, "image_id": 1},
                        {"id": 5, "image_id": True, "caption": "x"}, {"id": 6, "caption": "x"},
                        {"id": "7", "image_id": 1, "caption": "x"}, [1], {"id": 9, "image_id": 1, "caption": "a cat"}]}))
    images, annotations, problems = load_coco_captions(path)
    assert images == [{"id": 1, "file_name": "a.jpg"}]
    assert [a["caption"] for a in annotations] == ["a dog", "a cat"]              # the good ones are kept
    assert [p["entry"] for p in problems["malformed_image"]] == ["images[1]", "images[2]", "images[3]", "images[4]"]
    assert [p["entry"] for p in problems["caption_not_a_string"]] == [f"annotations[{i}]" for i in (1, 2, 3)]
    assert problems["caption_not_a_string"][0]["caption_id"] == 2
    assert [p["entry"] for p in problems["malformed_annotation"]] == [f"annotations[{i}]" for i in (4, 5, 6, 7)]
    assert all(p["file"] == str(path) and p["reason"] for kind in problems.values() for p in kind)


def test_unreadable_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_coco_captions(tmp_path / "nope.json")


def test_fraction_split_is_deterministic_disjoint_and_order_free():
    ids = list(range(1000, 3000))
    a = split_by_fraction(ids, 0.1, 0.2, seed=3)
    b = split_by_fraction(list(reversed(ids)), 0.1, 0.2, seed=3)
    c = split_by_fraction(ids, 0.1, 0.2, seed=4)
    assert a == b and a != c
    assert set(a) == set(ids)                                   # every image in exactly one split
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    # the fractions up to sampling noise: ±3 standard deviations of a binomial over 2000 images
    for split, fraction in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(counts[split] - fraction * 2000) < 3 * (2000 * fraction * (1 - fraction)) ** 0.5


def test_pictures_two_splits_share_are_counted_and_logged_with_an_example():
    from array import array
    from pipeline.splits import shared_pictures
    keys = {"train": [1, 2, 3], "val": [4], "test": [3, 5, 2]}
    seen = {s: (array("Q", k), array("q", [100 * (i + 1) + j for j in range(len(k))])) for i, (s, k) in
            enumerate(keys.items())}
    with captioner_log() as lines:
        assert shared_pictures(seen) == {"train/test": 2}
    assert lines == ["splits: 2 test pictures are byte-identical to train ones (first: test image 302, train image "
                     "101): its scores count pictures the model trained on. Fix: keep each picture in one split"]


def test_growing_the_data_moves_no_image_between_splits():
    before = split_by_fraction(range(200), 0.1, 0.1, seed=0)
    after = split_by_fraction(list(range(200)) + list(range(5000, 5020)), 0.1, 0.1, seed=0)
    assert {i: after[i] for i in before} == before
    assert split_changes(before, after) == {"compared_images": 200, "moved": 0, "examples": []}
    # the check that reports it counts real moves
    moved = {**after, 3: "test" if after[3] != "test" else "train"}
    assert split_changes(before, moved)["moved"] == 1


def test_make_annotations_writes_manifests_by_image(tmp_path):
    names = [f"{i:012d}.jpg" for i in range(1, 41)]
    make_images(tmp_path / "imgs", names)
    f = write_coco(tmp_path / "c.json", [{"id": i, "file_name": n} for i, n in enumerate(names, 1)],
                   [{"id": k, "image_id": 1 + k % 40, "caption": f"word{k % 7} here"} for k in range(200)])
    out = tmp_path / "out"
    out.mkdir()
    report = make_annotations(out, [f], [tmp_path / "imgs"], None, 0.25, 0.25, seed=1)
    loaded = {s: manifests.read_manifest(manifests.manifest_path(out, s)) for s in ("train", "val", "test")}
    ids = [r["image_id"] for recs in loaded.values() for r in recs]
    assert sorted(ids) == list(range(1, 41))                    # no image in two splits, none lost
    assert all(len(r["captions"]) == 5 for recs in loaded.values() for r in recs)   # captions stay with image
    assert report["splits"]["val"] == {"images": 10, "captions": 50}
    assert json.loads((out / "report.json").read_text()) == report


# ----------------------------------------------------------------------------- the streamed reader

def json_loads_verdict(raw: bytes) -> str | None:
    """What reading the whole file with json.loads says about `raw`: the message part of our InputError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"is not UTF-8 text (invalid byte at offset {e.start})"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    return None


DOC = ('{"info": {"v": [1, 2.5e3, -7, true, false, null], "s": "x\\\\y"},\n "images": [{"id": 1, "file_name": '
       '"\u00e9\u00e8.jpg"}, {"id": 22, "file_name": "b.jpg", "digits": [1, 2]}],\r\n\t"annotations" : [ {"id": 3, '
       '"image_id": 1, "caption": "Caf\u00e9 \\"quoted\\" \\u00e9 \u4e2d"} ,{"id":4,"image_id":22,"caption":"a"}] }'
       '\n').encode("utf-8")


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of a few bytes, so every value, string, number and UTF-8 character is cut somewhere."""
    from pipeline import coco_files

    def use(block):
        monkeypatch.setattr(coco_files, "_BLOCK", block)
        monkeypatch.setattr(coco_files, "_AHEAD", 2)
    return use


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 1 << 22])
def test_streamed_reading_equals_json_loads(tmp_path, tiny_blocks, block, digits_plugin):
    tiny_blocks(block)
    path = tmp_path / "captions.json"
    path.write_bytes(DOC)
    images, annotations, problems = load_coco_captions(path)
    data = json.loads(DOC)
    assert images == [{"id": i["id"], "file_name": i["file_name"], **({"digits": i["digits"]} if "digits" in i else {})}
                      for i in data["images"]]
    assert annotations == [{"id": a["id"], "image_id": a["image_id"], "caption": a["caption"]}
                           for a in data["annotations"]]
    assert problems == {}


def malformed_versions(doc: bytes):
    """Every prefix of `doc`, and `doc` with one byte replaced by a character that breaks JSON somewhere."""
    yield from (doc[:n] for n in range(len(doc)))
    for at in range(0, len(doc), 3):
        for junk in (b",", b"]", b"}", b'"', b"x", b"\xff", b" ", b"{"):
            yield doc[:at] + junk + doc[at + 1:]
    yield b"\xef\xbb\xbf" + doc                                                # a byte order mark
    yield doc + b"{}"                                                          # extra data
    yield doc.replace(b"] }", b"], }")                                         # a trailing comma
    yield doc.replace(b'"a"}]', b'"a"},]')
    yield b""
    yield b"   \n"


@pytest.mark.parametrize("block", [1, 3, 1 << 22])
def test_malformed_json_is_reported_as_json_loads_reports_it(tmp_path, tiny_blocks, block):
    """Truncated or damaged files: the same message, line and column as json.loads of the whole file, and a byte
    that is not UTF-8 anywhere in the file named before any JSON error, as decoding the whole file first does."""
    tiny_blocks(block)
    path = tmp_path / "captions.json"
    for content in malformed_versions(DOC):
        path.write_bytes(content)
        verdict = json_loads_verdict(content)
        try:
            load_coco_captions(path)
        except InputError as e:
            if verdict is not None:
                assert f"{path}: COCO captions file {verdict}" in str(e), (content, str(e))
                assert "Fix:" in str(e)
            else:   # valid JSON, wrong structure: named as before
                assert "top level" in str(e) or "expected" in str(e) or "missing key" in str(e), (content, str(e))
        else:
            assert verdict is None, (content, verdict)


def test_a_bad_byte_after_a_json_error_is_named_first(tmp_path, tiny_blocks):
    tiny_blocks(5)
    path = tmp_path / "captions.json"
    path.write_bytes(b'{"images": [}, "annotations": [], "x": "\xff"}')
    with pytest.raises(InputError, match=r"not UTF-8 text \(invalid byte at offset 40\)"):
        load_coco_captions(path)


def test_errors_deep_in_a_large_file_name_line_and_column(tmp_path):
    """A file of several blocks: the position of an error counts the lines and characters of the blocks read."""
    lines = ['{"images": ['] + [f'{{"id": {i}, "file_name": "{i}.jpg"}},' for i in range(200_000)]
    lines += ['{"id": 1, "file_name": "x.jpg" "oops"}], "annotations": []}']
    raw = "\n".join(lines).encode()
    path = tmp_path / "captions.json"
    path.write_bytes(raw)
    assert len(raw) > (1 << 22)
    with pytest.raises(InputError) as e:
        load_coco_captions(path)
    assert json_loads_verdict(raw) in str(e.value) and "line 200002 column 32" in str(e.value)


@pytest.mark.parametrize("content, needle", [
    (b'{"images": [], "annotations": [], "images": []}', "key 'images' appears 2 times at top level"),
    (b'{"images": [], "annotations": 5}', "annotations: expected a list, got int 5"),
    (b'{"annotations": {}}', "missing key 'images'"),                    # missing before wrongly typed, as before
    (b'"text"', "top level: expected a JSON object"),
])
def test_structure_errors_name_file_and_field(tmp_path, content, needle):
    path = tmp_path / "captions_bad.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=needle):
        load_coco_captions(path)


def test_ids_outside_64_bits_are_malformed_entries(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 2 ** 63, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                                "annotations": [{"id": -2 ** 64, "image_id": 1, "caption": "x"},
                                                {"id": 2, "image_id": 2 ** 70, "caption": "y"},
                                                {"id": 3, "image_id": 1, "caption": "z"}]}))
    images, annotations, problems = load_coco_captions(path)
    assert [i["id"] for i in images] == [1] and [a["id"] for a in annotations] == [3]
    assert [p["reason"] for p in problems["malformed_image"]] == [f"'id' {2 ** 63} is outside the 64-bit integer range"]
    assert [p["entry"] for p in problems["malformed_annotation"]] == ["annotations[0]", "annotations[1]"]


def test_karpathy_split_streamed_last_listing_wins_and_errors_kept(tmp_path):
    from pipeline.coco_files import load_karpathy_split
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": [{"cocoid": 5, "split": "val", "sentences": []},
                                                              {"cocoid": 2, "split": "restval"},
                                                              {"cocoid": 5, "split": "test"}]}))
    assert load_karpathy_split(path) == {2: "train", 5: "test"}
    path.write_text(json.dumps({"images": [{"cocoid": 1, "split": "train"}, {"cocoid": 2, "split": "dev"}]}))
    with pytest.raises(InputError, match=r"images\[1\].split = 'dev'"):
        load_karpathy_split(path)
    path.write_text('{"images": [{"cocoid": 1, "split": "dev"}], "x": [}')   # not JSON: said first, as before
    with pytest.raises(InputError, match="not valid JSON"):
        load_karpathy_split(path)
    path.write_text('{"images": {}}')
    with pytest.raises(InputError, match="expected an object with an 'images' list"):
        load_karpathy_split(path)


def test_split_file_conflicts_and_images_in_no_caption_file_are_reported(tmp_path):
    """An image the split file lists in two splits is kept in the last one and reported; images the split file
    lists that no caption file holds (a caption file left out) are counted per split."""
    make_images(tmp_path / "imgs", ["1.jpg", "2.jpg"])
    f = write_coco(tmp_path / "captions.json", [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2)],
                   [{"id": 10 + i, "image_id": i, "caption": "A cat."} for i in (1, 2)])
    split = tmp_path / "dataset_coco.json"
    split.write_text(json.dumps({"images": [{"cocoid": 1, "split": "test"}, {"cocoid": 2, "split": "train"},
                                            {"cocoid": 1, "split": "train"}, {"cocoid": 3, "split": "test"},
                                            {"cocoid": 4, "split": "test"}, {"cocoid": 5, "split": "val"}]}))
    splits, report = extract_annotations([f], [tmp_path / "imgs"], karpathy_split=split)
    assert [r["image_id"] for r in splits["train"]] == [1, 2] and splits["test"] == []
    assert report["problems"]["split_file_conflict"] == [{"image_id": 1, "split": "train"}]
    assert report["split_file"] == {"listed": {"train": 2, "val": 1, "test": 2},
                                    "in_no_caption_file": {"train": 0, "val": 1, "test": 2}}


def test_problem_lists_are_capped_and_counts_exact(tmp_path, monkeypatch):
    from pipeline import problems
    monkeypatch.setattr(problems, "LISTED_PER_KIND", 3)
    make_images(tmp_path / "imgs", ["a.jpg"])
    f = write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "a.jpg"}] + [{"id": 1, "file_name": "a.jpg"}] * 10,
                   [{"id": 7, "image_id": 1, "caption": "A dog."}] * 12 + [{"image_id": 1, "caption": "..."}] * 5)
    splits, report = extract_annotations([f], [tmp_path / "imgs"], val_fraction=0, test_fraction=0)
    assert report["problem_counts"]["duplicate_image_id"] == 10
    assert report["problem_counts"]["duplicate_caption_id"] == 11
    assert report["problem_counts"]["empty_caption"] == 5
    assert {k: len(v) for k, v in report["problems"].items()} == {
        "empty_caption": 3, "duplicate_image_id": 3, "duplicate_caption_id": 3}
    assert report["problems"]["empty_caption"][0] == {"file": str(f), "caption_id": None, "image_id": 1,
                                                      "caption": "..."}
    assert report["problems_listed_at_most"] == 3
    assert [r["captions"] for r in splits["train"]] == [["a dog"]]


def test_normalising_in_batches_equals_normalize_caption():
    import random

    from pipeline.captions import normalised_lines as _normalised_lines
    rng = random.Random(1)
    alphabet = "aZ09 '`_-.,!?\t\n\r\x0b\x0c\x1c\x1f\x7f\"\\\u00e9\u2019\u02bc\ufb01\ud800abcdefghij  "
    for _ in range(2000):
        captions = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(1, 30))]
        if rng.random() < 0.5:
            captions = [c.encode("ascii", "ignore").decode() for c in captions]
        assert _normalised_lines(captions) == [normalize_caption(c).encode("utf-8", "surrogatepass") for c in captions]


def test_manifest_writer_writes_the_lines_write_manifest_writes(tmp_path):
    records = [{"image_id": 5, "root": "images:0", "path": 'a "q".jpg', "captions": ["a dog", "b"],
                "raw_captions": ['A "dog"\n', "B\u2028"]},
               {"image_id": -2, "root": "r", "path": "\u00e9.jpg", "captions": ["x"], "raw_captions": ["X"],
                "digits": [1, 2], "digit_boxes": [[0, 0, 1, 1], [1, 0, 1, 1]], "width": 3, "height": 4}]
    manifests.write_manifest(tmp_path / "a.jsonl", records)
    with manifests.ManifestWriter(tmp_path / "b.jsonl") as writer:
        for r in records:
            extra = {k: v for k, v in r.items() if k not in manifests.MANIFEST_KEYS}
            writer.add(r["image_id"], manifests.json_string(r["root"]), manifests.json_string(r["path"]),
                       b", ".join(map(manifests.json_string, r["captions"])),
                       b", ".join(map(manifests.json_string, r["raw_captions"])), manifests.extra_keys_json(extra))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert list(manifests.iter_locations(tmp_path / "a.jsonl")) == [(5, "images:0", 'a "q".jpg'),
                                                                     (-2, "r", "\u00e9.jpg")]
    assert manifests.json_lines(["a\nb", "\ud800"]) == b'"a\\nb"\n"\\ud800"\n'   # no raw newline; no bad UTF-8


def test_make_annotations_compares_splits_with_the_previous_output(tmp_path):
    names = [f"{i}.jpg" for i in range(1, 31)]
    make_images(tmp_path / "imgs", names)
    f = write_coco(tmp_path / "c.json", [{"id": i, "file_name": n} for i, n in enumerate(names, 1)],
                   [{"id": i, "image_id": i, "caption": f"word{i}"} for i in range(1, 31)])
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    make_annotations(tmp_path / "one", [f], [tmp_path / "imgs"], None, 0.3, 0.3, seed=1)
    report = make_annotations(tmp_path / "two", [f], [tmp_path / "imgs"], None, 0.3, 0.3, seed=1,
                              previous=tmp_path / "one")
    assert report["split_changes"] == {"previous": "one", "compared_images": 30, "moved": 0, "examples": []}
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "missing_images.jsonl", "report.json", "test.jsonl", "train.jsonl", "val.jsonl"]   # no scratch left behind
    (tmp_path / "other").mkdir()   # another config in the workspace, split by another seed, made since
    make_annotations(tmp_path / "other", [f], [tmp_path / "imgs"], None, 0.3, 0.3, seed=2)
    (tmp_path / "three").mkdir()
    report = make_annotations(tmp_path / "three", [f], [tmp_path / "imgs"], None, 0.3, 0.3, seed=1,
                              previous=manifests.earlier_outputs(tmp_path, tmp_path / "three"))
    assert report["split_changes"]["previous"] == "two" and report["split_changes"]["moved"] == 0   # not "other"
