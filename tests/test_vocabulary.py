"""Stage 2: vocabulary order, thresholds, train-only counting, caption ⇄ ids."""
import json

import numpy as np
import pytest

from pipeline.vocabulary import SPECIALS, Vocabulary, build_vocabulary, make_vocabulary
from storage import manifests
from tests.conftest import captioner_log


def records(*caption_lists):
    return [{"image_id": i, "root": "/r", "path": f"{i}.jpg", "captions": caps, "raw_captions": caps}
            for i, caps in enumerate(caption_lists)]


TRAIN = records(["a dog runs", "a dog sits"], ["the cat sits", "a cat"], ["zebra zebra"])


def test_order_specials_and_counts():
    v = build_vocabulary(TRAIN, min_count=1)
    assert v["tokens"][:4] == list(SPECIALS) == ["<pad>", "<start>", "<end>", "<unk>"]
    # count descending, ties alphabetical
    assert v["tokens"][4:] == ["a", "cat", "dog", "sits", "zebra", "runs", "the"]
    assert v["counts"] == {"a": 3, "cat": 2, "dog": 2, "sits": 2, "zebra": 2, "runs": 1, "the": 1}


def test_deterministic_regardless_of_record_order():
    assert build_vocabulary(TRAIN, 1) == build_vocabulary(list(reversed(TRAIN)), 1)


def test_min_count_and_max_size():
    assert build_vocabulary(TRAIN, min_count=2)["tokens"][4:] == ["a", "cat", "dog", "sits", "zebra"]
    assert build_vocabulary(TRAIN, min_count=1, max_size=6)["tokens"] == list(SPECIALS) + ["a", "cat"]
    stats = build_vocabulary(TRAIN, min_count=2)["stats"]
    assert stats["token_coverage"] == pytest.approx(11 / 13, abs=1e-6)


def test_counts_only_the_training_split(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    manifests.write_manifest(manifests.manifest_path(ann, "train"), TRAIN)
    manifests.write_manifest(manifests.manifest_path(ann, "val"), records(["validation only words"] * 9))
    manifests.write_manifest(manifests.manifest_path(ann, "test"), records(["test words"] * 9))
    out = tmp_path / "vocab"
    out.mkdir()
    artifact = make_vocabulary(ann, out, min_count=1, max_size=0, max_length=20, length_policy="truncate")
    assert "validation" not in artifact["tokens"] and "words" not in artifact["tokens"]
    assert json.loads((out / "vocab.json").read_text()) == artifact


@pytest.mark.parametrize("policy, says", [("truncate", "keeps their first words"), ("drop", "drops them")])
def test_captions_longer_than_max_length_are_counted_in_a_warning(tmp_path, policy, says):
    ann, out = tmp_path / "annotations", tmp_path / "vocab"
    ann.mkdir(), out.mkdir()
    manifests.write_manifest(manifests.manifest_path(ann, "train"),
                             records(["one two three four five six", "one two", "a b c d e f g h"]))
    with captioner_log() as lines:
        make_vocabulary(ann, out, min_count=1, max_size=0, max_length=5, length_policy=policy)
    assert [line for line in lines if "longer than" in line] == [
        f"vocabulary: 2 of 3 train captions are longer than [vocabulary] max_length = 5 words (the longest 8): "
        f"training {says}"]


def test_encode_decode_and_padding():
    vocab = Vocabulary(build_vocabulary(TRAIN, min_count=1, max_length=3))
    ids = vocab.encode("a dog flies")
    assert ids == [1, vocab.index["a"], vocab.index["dog"], 3, 2]          # unknown word → <unk>
    assert vocab.decode(ids) == "a dog <unk>"
    batch = vocab.encode_batch(["a dog", "the cat sits"])
    assert batch.dtype == np.int32 and batch.shape == (2, 5)               # padded to the longest, not a global max
    assert batch[0].tolist() == [1, vocab.index["a"], vocab.index["dog"], 2, 0]
    assert vocab.decode(batch[0]) == "a dog"


def test_length_policy_truncate_or_drop():
    truncate = Vocabulary(build_vocabulary(TRAIN, min_count=1, max_length=2, length_policy="truncate"))
    drop = Vocabulary(build_vocabulary(TRAIN, min_count=1, max_length=2, length_policy="drop"))
    assert truncate.decode(truncate.encode("a dog runs")) == "a dog"
    assert drop.encode("a dog runs") is None
    assert drop.encode_batch(["a dog runs", "a cat"]).shape == (1, 4)


def test_counted_from_the_streamed_manifest_as_from_records(tmp_path):
    """make_vocabulary reads only the captions of each line (storage.manifests.iter_captions); lines written by
    hand in another layout are parsed whole. Either way the artifact is build_vocabulary's of the records."""
    ann = tmp_path / "annotations"
    ann.mkdir()
    train = TRAIN + records([], ["a dog's bowl", "dog  dog"])
    manifests.write_manifest(manifests.manifest_path(ann, "train"), train)
    with open(manifests.manifest_path(ann, "train"), "a") as f:   # hand-written: other key order and spacing
        f.write(json.dumps({"captions": ["zebra a", "a"], "image_id": 9, "root": "/r", "path": "9.jpg",
                            "raw_captions": ["Zebra, a", "A"]}, separators=(",", ":")) + "\n")
        f.write('{"image_id": 10, "root": "/r", "path": "10.jpg", "captions": ["say \\"hi\\"", "ok"], '
                '"raw_captions": ["", ""]}\n')
    manifests.write_manifest(manifests.manifest_path(ann, "val"), [])
    manifests.write_manifest(manifests.manifest_path(ann, "test"), [])
    expected = train + [{"captions": ["zebra a", "a"]}, {"captions": ['say "hi"', "ok"]}]
    assert list(manifests.iter_captions(manifests.manifest_path(ann, "train"))) == [r["captions"] for r in expected]
    out = tmp_path / "vocab"
    out.mkdir()
    artifact = make_vocabulary(ann, out, min_count=1, max_size=0, max_length=2, length_policy="truncate")
    assert artifact == build_vocabulary(expected, min_count=1, max_length=2)
    assert artifact["stats"]["train_images"] == 7 and artifact["stats"]["captions_longer_than_max_length"] == 4


def test_caption_lengths_counted_by_spaces_only_where_that_is_exact():
    """Batches of single-spaced captions are measured by their spaces; any other whitespace, an empty caption or
    a double space sends the batch to str.split. Either way: the lengths and counts of str.split."""
    import random
    from collections import Counter

    from pipeline.vocabulary import _count
    rng = random.Random(0)
    for _ in range(5000):
        lists = [["".join(rng.choice("ab \t\u00a0") for _ in range(rng.randint(0, 6)))
                  for _ in range(rng.randint(0, 3))] for _ in range(rng.randint(0, 5))]
        counts, lengths, images = _count(lists)
        assert lengths == Counter(len(c.split()) for captions in lists for c in captions)
        assert counts == Counter(w for captions in lists for c in captions for w in c.split())
        assert images == len(lists)


def test_captions_without_spaces_are_named_in_a_warning(tmp_path):
    ann, out = tmp_path / "annotations", tmp_path / "vocab"
    ann.mkdir(), out.mkdir()
    captions = ["一只猫坐在垫子上", "两只狗在草地上跑"]   # Chinese: no spaces between words
    manifests.write_manifest(manifests.manifest_path(ann, "train"), records(captions))
    with captioner_log() as lines:
        make_vocabulary(ann, out, min_count=1, max_size=0, max_length=20, length_policy="truncate")
    assert any(line.startswith("vocabulary: train captions average 1.00 words") for line in lines), lines
