"""Digit metrics (pipeline/digits/metrics.py), their place in evaluation, and attention pictures on one shared scale."""
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.digits import metrics as dg
from pipeline.encoder import cell_edges
from pipeline.digits.demo import NUMBER_WORDS, caption_templates
from pipeline.evaluate import evaluate_split, summary_table
from pipeline.plots import attention_grid, attention_maps, html_report, word_attention
from storage import shards
from tests.conftest import assert_real_picture, captioner_log


# ------------------------------------------------------------------------------------------ which words

@pytest.mark.parametrize("caption, expected", [
    ("Three handwritten digits: seven, two and nine.", [7, 2, 9]),
    ("a seven, a two and a nine from left to right", [7, 2, 9]),
    ("an image of three handwritten digits reading seven two nine", [7, 2, 9]),
    ("The handwritten number seven two nine", [7, 2, 9]),
    ("just a seven", [7]),
    ("A single handwritten seven.", [7]),
    ("the sequence seven, then two, then nine written by hand", [7, 2, 9]),
    ("three dark digits on a light background , a seven, a two and a nine", [7, 2, 9]),
    ("A handwritten seven, followed by a two and a nine.", [7, 2, 9]),
    ("Digits seven, two, nine written in dark ink.", [7, 2, 9]),
    ("One handwritten digit: one.", [1]),                  # the same word as a count, then as a digit
    ("two digits: four and zero", [4, 0]),
    ("one handwritten number eight", [8]),
    ("Two Numbers, FIVE and six!", [5, 6]),                # after normalisation: case, punctuation
    ("a man riding a horse", []),
])
def test_digit_sequence_reads_digits_and_skips_count_words(caption, expected):
    assert dg.digit_sequence(caption) == expected


def test_digit_sequence_reads_every_demo_template_for_every_digit_and_length():
    rng = np.random.default_rng(0)
    for _ in range(40):
        labels = rng.integers(0, 10, int(rng.integers(1, 5))).tolist()
        for template in caption_templates():
            caption = template([NUMBER_WORDS[d] for d in labels])
            assert dg.digit_sequence(caption) == labels, caption


def test_expected_digits_come_from_labels_only_never_from_caption_words():
    refs = ["three handwritten digits seven two nine", "a seven a two and a nine", "seven two eight"]
    assert dg.expected_digits({"digits": [1, 2], "captions": refs}) == [1, 2]
    assert dg.expected_digits({"captions": refs}) is None
    assert dg.expected_digits({"captions": ["two dogs and one frisbee"]}) is None
    assert dg.declares_digits([{"captions": refs}, {"digits": [], "captions": []}])
    assert not dg.declares_digits([{"captions": refs}])


def test_digits_exact_and_count_right_skip_images_without_expected_digits():
    expected = {1: [7, 2, 9], 2: [7, 2, 9], 3: [4], 4: None}
    hypotheses = {1: "three handwritten digits seven two nine",   # right
                  2: "three handwritten digits seven two eight",  # right count, wrong digit
                  3: "four handwritten digits four four",         # wrong count ("four" before digits counts)
                  4: "a dog"}                                     # no expectation: not scored
    assert dg.digits_exact(hypotheses, expected) == pytest.approx(1 / 3)
    assert dg.digit_count_right(hypotheses, expected) == pytest.approx(2 / 3)
    assert dg.digits_exact(hypotheses, {1: None}) is None and dg.digit_count_right({}, {}) is None


def test_distinct_captions_compares_normalised_captions():
    from pipeline.captions import distinct_captions
    assert distinct_captions({1: "A seven.", 2: "a seven", 3: "a two"}) == 2


# ------------------------------------------------------------------------------------- attention grounding

W, H, SIDE = 160, 80, 4          # cells about 50, 30, 30, 50 px wide and 25, 15, 15, 25 px high (cell_edges)


def one_hot(*cells, side=SIDE):
    """Attention rows (len(cells), side²) peaked at the given cells (a little spread elsewhere)."""
    rows = np.full((len(cells), side * side), 0.01, np.float32)
    for t, cell in enumerate(cells):
        rows[t, cell] = 1.0
    return rows / rows.sum(1, keepdims=True)


def test_cell_geometry_follows_the_squashed_image():
    # a 4×4 grid is InceptionV3 at 171 px: centres at 37.5, 69.5, 101.5, 133.5 px, cells split at the midpoints
    assert cell_edges(SIDE) == pytest.approx([0, 53.5 / 171, 85.5 / 171, 117.5 / 171, 1])
    assert cell_edges(8)[1] * 299 == pytest.approx(53.5) and cell_edges(8)[7] * 299 == pytest.approx(245.5)
    assert dg.cell_rectangle(0, SIDE, (W, H)) == pytest.approx((0, 0, 53.5 / 171 * W, 53.5 / 171 * H))
    assert dg.cell_rectangle(6, SIDE, (W, H)) == pytest.approx(                # row 1, column 2
        (85.5 / 171 * W, 53.5 / 171 * H, 117.5 / 171 * W, 85.5 / 171 * H))
    assert dg.overlaps((0, 0, 40, 20), [39, 19, 5, 5])
    assert not dg.overlaps((0, 0, 40, 20), [40, 0, 10, 10])                 # touching edges: zero area


def test_mixed7_cells_are_16_px_apart_from_21_5():
    # mixed7 at 299 px: 17×17 cells centred at 21.5 + 16k, split at the midpoints 29.5, 45.5, …, 269.5
    edges = cell_edges(17, "mixed7")
    assert len(edges) == 18 and edges[1] * 299 == pytest.approx(29.5) and edges[16] * 299 == pytest.approx(269.5)
    assert dg.cell_rectangle(18, 17, (299, 299), "mixed7") == pytest.approx((29.5, 29.5, 45.5, 45.5))
    # a digit at x 30–45 is grounded by mixed7's column 1 but not by column 2
    words, boxes = ["seven"], [[30, 30, 15, 15]]
    assert dg.grounded_digit_words(words, one_hot(18, side=17), boxes, (299, 299), "mixed7") == (1, 1)
    assert dg.grounded_digit_words(words, one_hot(19, side=17), boxes, (299, 299), "mixed7") == (0, 1)
    # the picture puts the peak where the cell looks: cell (1, 1) at (37.5, 37.5) of 299 px
    maps = attention_maps(one_hot(18, side=17), (299, 299), layer="mixed7")
    assert np.unravel_index(np.argmax(maps[0]), maps[0].shape) == pytest.approx((37, 37), abs=2)


def test_grounding_matches_kth_digit_word_to_kth_box_and_ignores_count_words():
    words = "two handwritten digits seven and nine".split()
    boxes = [[10, 25, 20, 30], [90, 5, 30, 30]]    # seven: column 0, rows 1-2; nine: columns 2, rows 0-1
    # "two" (a count) looks anywhere; "seven" at cell 4 (row 1, col 0); "nine" at cell 2 (row 0, col 2)
    attention = one_hot(15, 15, 15, 4, 15, 2)
    assert dg.grounded_digit_words(words, attention, boxes, (W, H)) == (2, 2)
    # the argmax one cell to the right of the seven (cell 5: x 40-80) misses its box
    assert dg.grounded_digit_words(words, one_hot(15, 15, 15, 5, 15, 2), boxes, (W, H)) == (1, 2)


def test_grounding_counts_digit_words_beyond_the_boxes_as_not_grounded():
    words = "seven nine four".split()
    boxes = [[10, 25, 20, 30], [90, 5, 30, 30]]
    attention = one_hot(4, 2, 2)                   # "four" looks at the nine's box, but there is no third box
    assert dg.grounded_digit_words(words, attention, boxes, (W, H)) == (2, 3)


def test_attention_grounding_pools_images_and_is_none_without_boxes():
    words = {1: ["seven"], 2: ["seven", "nine"], 3: ["two"]}
    attention = {1: one_hot(4), 2: one_hot(5, 2), 3: one_hot(0)}
    boxes = {1: [[10, 25, 20, 30]], 2: [[10, 25, 20, 30], [90, 5, 30, 30]], 3: None}
    sizes = {1: (W, H), 2: (W, H), 3: None}
    assert dg.attention_grounding(words, attention, boxes, sizes) == pytest.approx(2 / 3)   # image 3 skipped
    assert dg.attention_grounding(words, attention, {3: None}, {3: None}) is None
    assert dg.attention_grounding({1: ["a", "dog"]}, {1: one_hot(0, 0)}, {1: [[0, 0, 5, 5]]}, {1: (W, H)}) is None


# --------------------------------------------------------------------------------- one scale per image

def test_attention_maps_share_one_scale_so_uniform_attention_stays_dim():
    peaked = np.full(64, 0.3 / 63, np.float32)
    peaked[27] = 0.7
    uniform = np.full(64, 1 / 64, np.float32)
    maps = attention_maps(np.stack([peaked, uniform]), (80, 80))
    assert maps[0].max() == pytest.approx(1.0, abs=0.05)
    assert maps[1].max() == pytest.approx((1 / 64) / 0.7, abs=0.01)     # dim, not full brightness
    assert maps[1].max() < 0.05


def test_word_attention_keeps_the_rows_of_the_words_the_caption_shows():
    tokens = [5, 0, 1, 6, 2, 7, 0]                  # word, <pad>, <start>, word, <end>, after the end
    alphas = np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    assert word_attention(tokens, alphas)[:, 0].tolist() == [0, 3]


def test_attention_grid_writes_a_png(tmp_path):
    image = np.full((60, 90, 3), 200, np.uint8)
    attention_grid(image, ["a", "seven"], one_hot(4, 6), tmp_path / "grid.png")
    assert_real_picture(tmp_path / "grid.png")


# ------------------------------------------------------------------------------------------- in reports

DIGITS_BLOCK = {"digits_exact": 0.5, "digit_count_right": 0.75, "attention_grounding": None,
                "images": 4, "images_with_digits": 4, "images_with_boxes": 0}


def test_summary_table_and_html_report_show_cider_d_digits_and_diversity(tmp_path, digits_plugin):
    corpus = {"Bleu_4": 0.25, "METEOR": None, "CIDEr": 1.5}
    table = summary_table(corpus, 3, 4, {"digits": DIGITS_BLOCK})
    assert "CIDEr-D" in table and "digits exact" in table and "3 / 4 images" in table
    assert "attention grounding" in table and "unavailable" in table
    entry = {"section": "s", "image": np.full((40, 60, 3), 128, np.uint8), "image_id": 1, "caption": "a seven",
             "references": ["a seven"], "cider": 1.0, "words": ["a", "seven"], "alphas": one_hot(0, 5),
             "details": [dg.DigitMetrics().describe("a seven", {"digits": [7]})]}
    html_report(tmp_path / "r.html", "t", corpus, [entry], [], [(dg.DigitMetrics(), DIGITS_BLOCK)], None, (3, 4))
    page = (tmp_path / "r.html").read_text()
    assert "digits named [7], expected [7]" in page
    assert "<th>CIDEr-D</th>" in page and "<th>CIDEr</th>" not in page
    assert "digits exact" in page and "3 distinct captions / 4 images" in page and "uniform attention = 1/16" in page


def write_split(tmp_path, records, captions, tokens, attention, attrs=None):
    """A tiny GenerateCaptions output + manifest for evaluate_split (images are plain grey JPEGs)."""
    paths = []
    for r in records:
        paths.append(str(tmp_path / f"{r['image_id']}.jpg"))
        Image.new("RGB", (W, H), (200, 200, 200)).save(paths[-1])
        r.update(root=str(tmp_path), path=f"{r['image_id']}.jpg", raw_captions=r["captions"])
    with open(tmp_path / "test.jsonl", "w") as f:    # written by hand: manifests.write_manifest keeps fewer keys
        f.writelines(json.dumps(r) + "\n" for r in records)
    (tmp_path / "test.json").write_text(json.dumps([{"image_id": r["image_id"], "caption": c}
                                                    for r, c in zip(records, captions)]))
    shards.write_attention(tmp_path / "att.h5", [r["image_id"] for r in records], paths, tokens, attention,
                           attrs or {})


def evaluate_logged(tmp_path) -> tuple[dict, str]:
    """evaluate_split over the split write_split wrote in tmp_path: (metrics, what it logged)."""
    with captioner_log() as lines:
        metrics = evaluate_split(tmp_path / "out", "test", tmp_path / "test.json", tmp_path / "att.h5",
                                 tmp_path / "test.jsonl", java=False, examples=1)
    return metrics, "\n".join(lines) + "\n"


def test_evaluate_split_adds_digit_metrics(tmp_path, digits_plugin):
    records = [{"image_id": 1, "captions": ["a seven", "just a seven"], "digits": [7],
                "digit_boxes": [[10, 25, 20, 30]], "width": W, "height": H},
               {"image_id": 2, "captions": ["two digits seven and nine", "seven nine"], "digits": [7, 9],
                "digit_boxes": [[10, 25, 20, 30], [90, 5, 30, 30]], "width": W, "height": H}]
    # image 1: "a seven" with a <pad> mid-caption (its attention row must be skipped); image 2: "seven"
    tokens = np.array([[4, 0, 5, 2], [5, 2, 0, 0]], np.int32)
    attention = np.stack([one_hot(0, 0, 4, 0), one_hot(5, 0, 0, 0)])
    write_split(tmp_path, records, ["a seven", "seven"], tokens, attention)
    metrics, logged = evaluate_logged(tmp_path)
    d = metrics["digits"]
    assert d["digits_exact"] == 0.5 and d["digit_count_right"] == 0.5
    assert d["attention_grounding"] == 0.5                 # image 1's seven at cell 4: yes; image 2's at cell 5: no
    assert (metrics["distinct_captions"], d["images"], d["images_with_boxes"]) == (2, 2, 2)
    assert [e["digits_exact"] for e in metrics["per_image"]] == [True, False]
    assert json.loads((tmp_path / "out" / "test.json").read_text())["digits"] == d
    assert "digits exact" in logged and "CIDEr-D" in logged
    assert "digits exact" in (tmp_path / "out" / "test-report.html").read_text()


@pytest.mark.parametrize("layer,grounded", [("mixed7", 1.0), (None, 0.0)])
def test_evaluate_split_places_cells_where_the_attention_files_layer_looks(tmp_path, layer, grounded, digits_plugin):
    # a 17×17 map peaked at cell (1, 1): mixed7's cell spans 29.5–45.5 px of 299, so it overlaps a digit at
    # 44–45 px; a file without a layer attr is read as mixed10 (a 17×17 mixed10 grid: 587 px input, cell 1 at
    # 53.5–85.5 px of it = 27.3–43.6 of 299), which misses it
    records = [{"image_id": 1, "captions": ["a seven"], "digits": [7], "digit_boxes": [[44, 44, 1, 1]],
                "width": 299, "height": 299}]
    attention = one_hot(18, 18, side=17)[None]
    write_split(tmp_path, records, ["a seven"], np.array([[4, 5]], np.int32), attention,
                {"layer": layer} if layer else None)
    assert shards.read_all_attention(tmp_path / "att.h5")["layer"] == (layer or "mixed10")
    metrics = evaluate_split(tmp_path / "out", "test", tmp_path / "test.json", tmp_path / "att.h5",
                             tmp_path / "test.jsonl", java=False, examples=1)
    assert metrics["digits"]["attention_grounding"] == grounded


def test_evaluate_split_without_digit_labels_has_no_digit_metrics_anywhere(tmp_path, digits_plugin):
    """A COCO-style dataset whose captions contain number words: "two dogs and one frisbee" names no digits,
    even with the digits plug-in registered (its metrics need labels)."""
    records = [{"image_id": 1, "captions": ["two dogs and one frisbee", "a man riding a horse"]},
               {"image_id": 2, "captions": ["three cats on a sofa", "a seven"]}]   # no labels, no boxes
    write_split(tmp_path, records, ["two dogs", "a seven"], np.array([[4, 5, 2], [4, 6, 2]], np.int32),
                np.stack([one_hot(0, 0, 0), one_hot(0, 0, 0)]))
    metrics, logged = evaluate_logged(tmp_path)
    assert "digits" not in metrics and metrics["distinct_captions"] == 2
    assert all("digit" not in key for entry in metrics["per_image"] for key in entry)
    for text in (logged, (tmp_path / "out" / "test-report.html").read_text().lower(),
                 (tmp_path / "out" / "test.json").read_text()):
        assert "digit" not in text
