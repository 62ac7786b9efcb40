"""Digit metrics for datasets whose images show digits and say which (the demo; COCO-format files whose `images`
entries carry "digits"): the image fields they read, digits exact, count right, attention grounding, and the
digit reward of self-critical training. Registered by pipeline.digits (extensions.METRICS "digits",
extensions.REWARDS "digits", extensions.IMAGE_FIELDS "digits").

Image fields: `digits` (labels, left to right), and optionally `digit_boxes` ([x, y, w, h] in pixels, same
order) with `width` and `height`. Kept only when well-formed; read by the metrics and the reward, never by
cross-entropy training.

Which words are digits. Captions are compared after pipeline.annotations.normalize_caption (lowercase,
punctuation to spaces). A number word (zero .. nine) names a digit, except when it counts them: a number
word is a COUNT when one of the next two tokens starts with "digit" or "number" ("three handwritten digits",
"two digits", "one handwritten number"). Nothing else is a digit ("a", "an", "single", "just", numerals).

Attention geometry. The encoder resizes the whole image to S×S without cropping, and its feature grid has
side × side cells (P = side² attention positions, row-major). InceptionV3's strided layers are 'valid', so
cell k is centred on input pixel offset + stride·k (mixed10: 37.5 + 32·k, at S = 299 37.5 … 261.5; mixed7:
21.5 + 16·k) and owns the input up to the midpoints between centres, e = pipeline.encoder.cell_edges(side,
layer) as fractions of S. So in ORIGINAL image
pixels (width W, height H) cell p = r·side + c covers

    x ∈ [e[c]·W, e[c+1]·W),   y ∈ [e[r]·H, e[r+1]·H)

and a digit box [x, y, w, h] covers [x, x + w) × [y, y + h). A digit word is grounded when the cell of its
largest attention weight intersects that digit's box with positive area.

Pure python / numpy: no TensorFlow.
"""
from __future__ import annotations

import numpy as np

from pipeline import extensions
from pipeline.captions import normalize_caption
from pipeline.encoder import DEFAULT_LAYER, cell_edges, grid_side

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_VALUE = {word: value for value, word in enumerate(NUMBER_WORDS)}
COUNTED = ("digit", "number")   # a number word followed (within two tokens) by these counts, not names


def digit_words(words: list[str]) -> list[tuple[int, int]]:
    """[(position in `words`, digit)] of the words that name digits, in order (rule in the module docstring).
    `words` are already-normalised tokens, e.g. a generated caption's words, so positions stay aligned
    with per-word attention rows."""
    found = []
    for k, word in enumerate(words):
        if word not in _VALUE:
            continue
        if any(following.startswith(COUNTED) for following in words[k + 1:k + 3]):
            continue   # "three handwritten digits": a count of the digits, not one of them
        found.append((k, _VALUE[word]))
    return found


def digit_sequence(caption: str) -> list[int]:
    """The digits a caption names, left to right as written: 'Three handwritten digits: seven, two and nine.'
    → [7, 2, 9]."""
    return [digit for _, digit in digit_words(normalize_caption(caption).split())]


def expected_digits(record: dict) -> list[int] | None:
    """The digits an image shows: its manifest record's "digits" labels (a dataset declares its digit truth
    that way: the demo, or COCO-format annotations whose images carry "digits"), else None. Never guessed from
    the captions: in "two dogs and one frisbee" the number words count things."""
    return [int(d) for d in record["digits"]] if record.get("digits") is not None else None


def declares_digits(records) -> bool:
    """Whether any manifest record carries digit labels (the digit metrics, epoch selection and reward apply)."""
    return any(r.get("digits") is not None for r in records)


def image_fields(image: dict) -> tuple[dict, str | None]:
    """The digit fields of one `images` entry of an annotation file, those well-formed, and why the others are
    dropped (or None): `digits` not a list of integers 0–9 leaves the image unlabelled; `digit_boxes` not one
    [x, y, w, h] per digit, or without the image's integer `width` and `height`, leaves it without grounding."""
    digits, boxes = image.get("digits"), image.get("digit_boxes")
    if digits is None:
        return {}, None
    if not (isinstance(digits, list) and all(type(d) is int and 0 <= d <= 9 for d in digits)):
        return {}, f"'digits' is not a list of integers 0-9 (got {digits!r:.60}): the image counts as unlabelled"
    if boxes is None:
        return {"digits": digits}, None
    if not (isinstance(boxes, list) and len(boxes) == len(digits)
            and all(isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
                    for b in boxes)):
        return {"digits": digits}, (f"'digit_boxes' is not one [x, y, w, h] per digit (got {boxes!r:.60}): "
                                    "dropped, the image has no attention grounding")
    if not (type(image.get("width")) is int and type(image.get("height")) is int):
        return {"digits": digits}, ("'digit_boxes' needs the image's integer 'width' and 'height' (got "
                                    f"{image.get('width')!r:.20}, {image.get('height')!r:.20}): dropped, the "
                                    "image has no attention grounding")
    return {"digits": digits, "digit_boxes": boxes, "width": image["width"], "height": image["height"]}, None


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def digits_exact(hypotheses: dict, expected: dict) -> float | None:
    """Share of images with an expected sequence whose caption names exactly those digits, in order.
    hypotheses {id: caption}; expected {id: list | None}. None when no image has an expected sequence."""
    return _share([digit_sequence(hypotheses[i]) == want for i, want in expected.items()
                   if want is not None and i in hypotheses])


def digit_count_right(hypotheses: dict, expected: dict) -> float | None:
    """Share of images with an expected sequence whose caption names the right NUMBER of digits (whichever)."""
    return _share([len(digit_sequence(hypotheses[i])) == len(want) for i, want in expected.items()
                   if want is not None and i in hypotheses])


def cell_rectangle(cell: int, side: int, image_size: tuple[float, float],
                   layer: str = DEFAULT_LAYER) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in original pixels of attention cell `cell` (row-major over a side × side grid of
    `layer` on the whole image, which the encoder squashed to a square without cropping), where InceptionV3's
    cell really looks (pipeline.encoder.cell_edges: mixed10's centred on 37.5 + 32·k of 299 px). image_size =
    (W, H)."""
    width, height = image_size
    row, col = divmod(int(cell), side)
    edges = cell_edges(side, layer)
    return edges[col] * width, edges[row] * height, edges[col + 1] * width, edges[row + 1] * height


def overlaps(rect: tuple[float, float, float, float], box) -> bool:
    """Whether a cell rectangle (x0, y0, x1, y1) and a box [x, y, w, h] intersect with positive area."""
    x0, y0, x1, y1 = rect
    x, y, w, h = box
    return min(x1, x + w) > max(x0, x) and min(y1, y + h) > max(y0, y)


def grounded_digit_words(words: list[str], attention, boxes, image_size,
                         layer: str = DEFAULT_LAYER) -> tuple[int, int]:
    """(grounded, emitted) digit words of one generated caption. attention (T, P): row t is the attention
    when words[t] was chosen (T ≥ len(words)), over the grid of `layer`; boxes [[x, y, w, h], ...] left to
    right in original pixels; image_size (W, H). The k-th digit word emitted is matched to the k-th box; digit
    words beyond the boxes are not grounded."""
    attention = np.asarray(attention, np.float32)
    side = grid_side(attention.shape[1])
    emitted = digit_words(words)
    grounded = sum(overlaps(cell_rectangle(int(np.argmax(attention[pos])), side, image_size, layer), boxes[k])
                   for k, (pos, _) in enumerate(emitted) if k < len(boxes))
    return grounded, len(emitted)


def attention_grounding(words: dict, attention: dict, boxes: dict, sizes: dict,
                        layer: str = DEFAULT_LAYER) -> float | None:
    """Share of emitted digit words, over all images with box information, whose argmax attention cell
    overlaps that digit's box (see grounded_digit_words). Dicts by image id: words {id: [str]}, attention
    {id: (T, P)} over the grid of `layer`, boxes {id: [[x, y, w, h], ...] | None}, sizes {id: (W, H) | None}.
    Images without boxes or size are skipped; None when no image has them (e.g. COCO) or no digit word was
    emitted: never 0 for "not measured"."""
    grounded = emitted = 0
    for i, image_boxes in boxes.items():
        if image_boxes is None or sizes.get(i) is None or i not in words:
            continue
        hit, total = grounded_digit_words(words[i], attention[i], image_boxes, sizes[i], layer)
        grounded, emitted = grounded + hit, emitted + total
    return grounded / emitted if emitted else None


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


class DigitReward:
    """1 − edit distance(digits the caption names, the image's digits) / the longer of the two, so 1 for exactly
    the right digits in order, partial credit for one digit wrong, missing or extra. `expected` is {image_id:
    [digits]} (expected_digits); images without digits score 0."""

    def __init__(self, expected: dict):
        self.expected = expected

    @classmethod
    def for_records(cls, train_records) -> "DigitReward":
        """The reward for a train split's manifest records; InputError when none carries digit labels."""
        from pipeline.errors import InputError

        expected = {r["image_id"]: expected_digits(r) for r in train_records}
        if not any(expected.values()):
            raise InputError("[training] scst_reward = digits, but no train image has digit labels (\"digits\" "
                             "in its annotation entry). Fix: scst_reward = cider.")
        return cls(expected)

    def scores(self, image_ids, captions) -> np.ndarray:
        out = []
        for image_id, caption in zip(image_ids, captions):
            want, got = self.expected.get(image_id), digit_sequence(caption)
            out.append(1.0 - edit_distance(got, want) / max(len(got), len(want), 1) if want else 0.0)
        return np.array(out, np.float32)


class DigitMetrics(extensions.Metrics):
    """The metrics file's "digits" block: digits exact, digit count right, attention grounding."""
    name = "digits"
    labels = {"digits_exact": "digits exact", "digit_count_right": "digit count right",
              "attention_grounding": "attention grounding"}
    val_labels = {"digits_exact": "digits exact"}
    truth_key = "digits"

    def declares(self, records) -> bool:
        return declares_digits(records)

    def evaluate(self, hypotheses: dict, records: dict, attention: dict) -> dict | None:
        """Records without boxes count for digits exact and count right but not for the grounding (None when no
        record has boxes: not measured)."""
        from pipeline.plots import word_attention

        if not declares_digits(records[i] for i in hypotheses):
            return None
        expected = {i: expected_digits(records[i]) for i in hypotheses}
        boxes, sizes, words, maps = {}, {}, {}, {}
        rows = {int(i): k for k, i in enumerate(attention["image_ids"])}
        for i in hypotheses:
            record = records[i]
            if record.get("digit_boxes") is None or record.get("width") is None or record.get("height") is None:
                continue
            boxes[i], sizes[i] = record["digit_boxes"], (record["width"], record["height"])
            words[i] = hypotheses[i].split()
            maps[i] = word_attention(attention["tokens"][rows[i]], attention["attention"][rows[i]])
        return {"digits_exact": digits_exact(hypotheses, expected),
                "digit_count_right": digit_count_right(hypotheses, expected),
                "attention_grounding": attention_grounding(words, maps, boxes, sizes, attention["layer"]),
                "images": len(hypotheses), "images_with_digits": sum(e is not None for e in expected.values()),
                "images_with_boxes": len(boxes)}

    def per_image(self, caption: str, record: dict) -> dict:
        want = expected_digits(record)
        return {} if want is None else {"digits_exact": digit_sequence(caption) == want}

    def describe(self, caption: str, record: dict) -> str:
        want = expected_digits(record)
        return "" if want is None else f"digits named {digit_sequence(caption)}, expected {want}"

    def note(self, block: dict) -> str:
        return (f"digits exact / count right: over {block['images_with_digits']} images with known digits; "
                "attention grounding: share of emitted digit words whose strongest attention cell overlaps that "
                f"digit's box, over {block['images_with_boxes']} images with boxes. Unavailable = nothing to "
                "measure (no digit labels, no boxes, or no digit word emitted), not a score of 0.")

    def val_scores(self, hypotheses: dict, records: dict) -> dict:
        return {"digits_exact": digits_exact(hypotheses, {i: expected_digits(records[i]) for i in hypotheses})}
