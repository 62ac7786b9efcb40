"""Every bad input we handle, and what each gets — run end to end through `luigi --module tasks` as a user would.

| input                                   | what happens                                              | exit |
|-----------------------------------------|-----------------------------------------------------------|------|
| annotation file: not JSON               | stops: file, line/column, "not valid JSON"                | 30   |
| annotation file: not UTF-8              | stops: file, byte offset, "not UTF-8"                     | 30   |
| annotation file: missing key            | stops: file, "missing key 'images'"                       | 30   |
| annotation file: wrong top-level type   | stops: file, "images: expected a list"                    | 30   |
| duplicate ids, captions of unknown      | counted and listed in report.json and the log, skipped;   | 0    |
| images, empty captions, null or non-    | every good image and caption kept                         |      |
| string captions, annotations without an |                                                           |      |
| integer image_id, images without id or  |                                                           |      |
| file_name                               |                                                           |      |
| image paths that are missing or not a   | listed as missing_image_file in report.json, skipped; a   | 0    |
| file                                    | rerun after they appear takes them in                     |      |
| file_name absolute or with '..'         | listed as image_outside_root in report.json, skipped      | 0    |
| no usable training image                | stops: the annotation files, the problems found, the fix  | 30   |
| images: corrupt, truncated, zero-byte,  | skipped with their reason (shard, split index, log);      | 0    |
| not an image, huge (bomb)               | every good image extracted                                |      |
| images: CMYK, grayscale, 16-bit,        | load and are extracted                                    | 0    |
| palette, RGBA, PNG/GIF named .jpg, EXIF |                                                           |      |
| [encoder] weights: no such file         | stops: section, key, the path, the alternatives           | 35   |
| [encoder] weights: not InceptionV3's    | stops before any work: "not an HDF5 file" or how many     | 35   |
| weights (a text file, another network)  | weight arrays it holds against InceptionV3's 376          |      |
| zero or negative sizes in the config    | stops: config file, section, key, the rule, the fix       | 35   |
| a non-number where a number belongs     | stops: section, key, "not a valid int"                    | 35   |
| unknown key or section in a config file | stops before any work: file, section, key, nearest name   | 35   |
| unknown --flag, invalid --split value   | stops before any work: the flag, nearest valid one        | 35   |
| abbreviated --flag (--training-epoch)   | stops before any work: the flag it abbreviates            | 35   |
| LUIGI_CONFIG_PATH names no file         | stops at once: the path, the fix                          | 35   |
| CaptionImages --images: a file, or a    | stops before any work: the path, the fix                  | 35   |
| folder without images                   |                                                           |      |
| select_by = digits_exact without digit  | stops before any work: the key, the fix                   | 35   |
| labels in the dataset                   |                                                           |      |
| a dataset path that does not exist      | stops before any work: section, key, the path             | 35   |
| caption files named, source not coco    | stops before any work: each key, "set source = coco"      | 35   |
| several of these at once                | all reported together                                     | 35   |
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.images import load_image
from pipeline.problems import LISTED_PER_KIND
from storage import manifests
from tests.badimages import REASON_KEYWORDS, make_bad_images
from tests.conftest import REPO, TEST_CONFIG, run_luigi


def coco_setup(tmp_path, images_dir, file_names, annotations_text=None, val_fraction=0):
    """A COCO captions file over `file_names` in `images_dir` (one caption each) and a config using it."""
    images = [{"id": i + 1, "file_name": name} for i, name in enumerate(file_names)]
    captions = [{"id": 100 + i, "image_id": i + 1, "caption": f"Image number {i}."} for i in range(len(images))]
    coco = tmp_path / "captions.json"
    if annotations_text is None:
        coco.write_text(json.dumps({"images": images, "annotations": captions}))
    else:
        coco.write_bytes(annotations_text)
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(TEST_CONFIG.read_text().replace(
        "[dataset]\nsource = demo", f"[dataset]\nsource = coco\nannotations = {coco}\nimages = {images_dir}\n"
        f"val_fraction = {val_fraction}\ntest_fraction = 0"))
    return coco, cfg


BAD_ANNOTATION_FILES = {
    "not JSON": (b'{"images": [', ["not valid JSON", "line 1"]),
    "not UTF-8": (b'{"images": [], "annotations": [{"image_id": 1, "caption": "caf\xe9"}]}', ["not UTF-8", "offset"]),
    "missing key": (b'{"annotations": []}', ["missing key 'images'"]),
    "wrong type": (b'{"images": {"id": 1, "file_name": "a.jpg"}, "annotations": []}',
                   ["images: expected a list"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATION_FILES))
def test_malformed_annotation_file_stops_naming_file_and_field(tmp_path, case):
    content, needles = BAD_ANNOTATION_FILES[case]
    coco, cfg = coco_setup(tmp_path, tmp_path, [], annotations_text=content)
    run = run_luigi("BuildVocabulary", config=cfg, workdir=tmp_path / "w")
    last = run.output.strip().splitlines()[-1]
    assert run.returncode == 30
    assert str(coco) in last and all(n in last for n in needles) and "Fix:" in last
    assert not list((tmp_path / "w").glob("annotations/[!.]*"))               # nothing complete-looking


def test_problems_in_annotations_are_counted_and_good_data_kept(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images_dir / name).write_bytes(b"jpeg bytes are not read at this stage")
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"},
                       {"id": 2, "file_name": "c.jpg"}],                                  # duplicate image id
            "annotations": [{"id": 1, "image_id": 1, "caption": "A good one."},
                            {"id": 1, "image_id": 2, "caption": "Duplicate caption id."},
                            {"id": 2, "image_id": 2, "caption": "Another good one."},
                            {"id": 3, "image_id": 9, "caption": "Unknown image."},
                            {"id": 4, "image_id": 1, "caption": "  ...  "},                # empty when normalised
                            {"id": 5, "image_id": 2, "caption": None},                     # not a string
                            {"id": 6, "image_id": "2", "caption": "A string id."},         # image_id not an int
                            {"id": 7, "image_id": 1, "caption": 42}],                      # not a string
            }
    data["images"].append({"file_name": "d.jpg"})                                          # no id
    (tmp_path / "outside.jpg").write_bytes(b"a file beside the image root, not in it")
    data["images"] += [{"id": 3, "file_name": "../outside.jpg"}, {"id": 4, "file_name": str(tmp_path / "outside.jpg")}]
    data["annotations"] += [{"id": 8, "image_id": 3, "caption": "Read from outside."},
                            {"id": 9, "image_id": 4, "caption": "Read from anywhere."}]
    coco, cfg = coco_setup(tmp_path, images_dir, [], annotations_text=json.dumps(data).encode())
    run = run_luigi("BuildVocabulary", config=cfg, workdir=tmp_path / "w")
    assert run.returncode == 0, run.output
    report = json.loads(next((tmp_path / "w").glob("annotations/*/report.json")).read_text())
    assert {k: v for k, v in report["problem_counts"].items() if v} == {
        "duplicate_image_id": 1, "duplicate_caption_id": 1, "caption_for_unknown_image": 1, "empty_caption": 1,
        "caption_not_a_string": 2, "malformed_annotation": 1, "malformed_image": 1, "image_outside_root": 2}
    assert [p["entry"] for p in report["problems"]["caption_not_a_string"]] == ["annotations[5]", "annotations[7]"]
    for kind in ("duplicate_image_id", "caption_for_unknown_image", "empty_caption", "caption_not_a_string"):
        assert kind in run.output                                               # and in the log
    train = manifests.read_manifest(next((tmp_path / "w").glob("annotations/*/train.jsonl")))
    assert {r["image_id"]: r["captions"] for r in train} == {1: ["a good one"], 2: ["another good one"]}


def test_bad_images_are_skipped_with_reasons_and_good_ones_extracted(tmp_path):
    corpus = make_bad_images(tmp_path / "images")
    names = sorted(corpus)
    files = [corpus[n][0].split("/images/", 1)[1] for n in names]
    coco, cfg = coco_setup(tmp_path, tmp_path / "images", files)
    run = run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=tmp_path / "w")
    assert run.returncode == 0, run.output
    index = json.loads(next((tmp_path / "w").glob("features/*/splits/*/train.json")).read_text())
    ids = {n: str(i + 1) for i, n in enumerate(names)}
    assert all(ids[n] in index["images"] for n in names if corpus[n][1])        # no good image lost
    for name, keyword in REASON_KEYWORDS.items():
        if name in ("missing_jpg", "directory_jpg"):      # not a file: ExtractAnnotations reports them
            continue
        assert keyword in index["skipped"][ids[name]]["reason"].lower(), name
        assert index["skipped"][ids[name]]["reason"] in run.output             # and the log says why
    report = json.loads(next((tmp_path / "w").glob("annotations/*/report.json")).read_text())
    assert sorted(p["path"] for p in report["problems"]["missing_image_file"]) == ["missing.jpg", "x.jpg"]
    assert sum(1 for n in names if corpus[n][1]) == len(index["images"])
    for name in ("cmyk_jpeg", "gray16_png", "png_named_jpg", "palette_png"):   # odd but good: really decoded
        assert load_image(corpus[name][0], 32).std() > 0


BAD_SETTINGS = [
    (("--encoder-weights", "/no/such/weights.h5"), ["[encoder] weights", "/no/such/weights.h5", "random:<seed>"]),
    (("--encoder-weights", "README.md"), ["[encoder] weights = 'README.md'", "is not an HDF5 file"]),
    (("--features-shard-size", "0"), ["[features] shard_size = 0 must be at least 1"]),
    (("--encoder-batch-size", "-4"), ["[encoder] batch_size = -4 must be at least 1"]),
    (("--encoder-image-size", "0"), ["[encoder] image_size = 0 must be at least 75"]),
    (("--demo-val-images", "0"), ["[demo] val_images = 0 must be at least 1"]),
    (("--training-epochs", "0"), ["[training] epochs = 0 must be at least 1"]),
    (("--decoder-units", "-1"), ["[decoder] units = -1 must be at least 1"]),
    (("--generation-beam-size", "0"), ["[generation] beam_size = 0 must be at least 1"]),
    (("--training-batch-size", "lots"), ["[training] batch_size: not a valid int"]),
    (("--decoder-positions", "maybe"), ["[decoder] positions: not a valid bool", "cannot interpret 'maybe'"]),
    (("--encoder-layer", "mixed7+cell_scores"), ["[encoder] layer = 'mixed7+cell_scores' needs weights = digits",
                                                 "use mixed7 with other weights"]),
    (("--dataset-plugins", "pipeline.nowhere"), ["[dataset] plugins: cannot import pipeline.nowhere"]),
    (("--decoder-attention-keys", "extras"), ["[decoder] attention_keys = 'extras'",
                                              "needs features with extra channels",
                                              "set attention_keys = features and context_extras = false"]),
    (("--decoder-context-extras", "true"), ["[decoder] context_extras = True needs attention_keys = extras"]),
    (("--pretrain-scene-train-from", "mixed9", "--encoder-layer", "mixed7"),
     ["[pretrain] scene_train_from = 'mixed9' must be all or a block at or below the feature layer mixed7"]),
    (("--training-bucket-width", "-1"), ["[training] bucket_width = -1 must be 0 (off) or more"]),
]


def test_images_missing_at_first_and_copied_in_later_join_the_dataset_on_the_rerun(tmp_path):
    """Every missing file counts, not only those the report lists (its first LISTED_PER_KIND): the last of
    LISTED_PER_KIND + 1 missing images, copied in, joins the dataset on the rerun, and the stages below see it
    (the annotations are remade under the same fingerprint)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"not decoded by this stage")
    missing = [f"m{i:05d}.jpg" for i in range(LISTED_PER_KIND + 1)]
    _, cfg = coco_setup(tmp_path, tmp_path / "images", ["a.jpg", *missing])
    first = run_luigi("BuildVocabulary", config=cfg, workdir=tmp_path / "w", timeout=120)
    assert first.returncode == 0, first.output
    output, = (tmp_path / "w").glob("annotations/[!.]*")
    vocab, = (tmp_path / "w").glob("vocabulary/[!.]*/vocab.json")
    assert json.loads(vocab.read_text())["stats"]["train_images"] == 1
    report = json.loads((output / "report.json").read_text())
    assert report["problem_counts"]["missing_image_file"] == len(missing)
    assert missing[-1] not in {p["path"] for p in report["problems"]["missing_image_file"]}   # beyond the listed
    again = run_luigi("ExtractAnnotations", config=cfg, workdir=tmp_path / "w", timeout=120)
    assert again.returncode == 0 and "is there now" not in again.output   # the other 1,000 are still missing
    assert "complete ones were encountered" in again.output
    (tmp_path / "images" / missing[-1]).write_bytes(b"copied in later")
    second = run_luigi("BuildVocabulary", config=cfg, workdir=tmp_path / "w", timeout=120)
    assert second.returncode == 0 and f"{missing[-1]} under" in second.output and "is there now" in second.output
    assert [json.loads(line)["path"] for line in (output / "train.jsonl").open()] == ["a.jpg", missing[-1]]
    assert json.loads(vocab.read_text())["stats"]["train_images"] == 2   # its caption counted too
    report = json.loads((output / "report.json").read_text())
    assert report["problem_counts"]["missing_image_file"] == len(missing) - 1
    (output / manifests.MISSING_FILE).unlink()   # as an output written before the file: the report's list counts
    (tmp_path / "images" / missing[0]).write_bytes(b"copied in later")
    third = run_luigi("ExtractAnnotations", config=cfg, workdir=tmp_path / "w", timeout=120)
    assert third.returncode == 0 and f"{missing[0]} under" in third.output and "is there now" in third.output


def test_image_files_gone_since_a_run_are_reported_missing_and_a_root_holding_none_stops_the_run(tmp_path):
    """A file deleted since the manifests were written is reported missing on the rerun, not left for extraction
    to skip; a root that holds none of its caption file's images (an unmounted or wrong folder) stops the run,
    naming it, and leaves the previous output as it was."""
    for root, names in (("A", ["a1.jpg", "a2.jpg"]), ("B", ["b1.jpg", "b2.jpg"])):
        (tmp_path / root).mkdir()
        for name in names:
            (tmp_path / root / name).write_bytes(b"not decoded by this stage")
        (tmp_path / f"{root}.json").write_text(json.dumps({
            "images": [{"id": ord(n[0]) * 10 + int(n[1]), "file_name": n} for n in names],
            "annotations": [{"id": ord(n[0]) * 10 + int(n[1]), "image_id": ord(n[0]) * 10 + int(n[1]),
                             "caption": f"picture {n}"} for n in names]}))
    _, cfg = coco_setup(tmp_path, tmp_path / "A", [])
    cfg.write_text(cfg.read_text().replace(f"annotations = {tmp_path / 'captions.json'}\nimages = {tmp_path / 'A'}",
                                           f"annotations = {tmp_path / 'A.json'},{tmp_path / 'B.json'}\n"
                                           f"images = {tmp_path / 'A'},{tmp_path / 'B'}"))
    run = lambda: run_luigi("ExtractAnnotations", config=cfg, workdir=tmp_path / "w", timeout=120)
    paths = lambda: [json.loads(line)["path"] for line in (output / "train.jsonl").open()]
    assert run().returncode == 0
    output, = (tmp_path / "w").glob("annotations/[!.]*")
    assert paths() == ["a1.jpg", "a2.jpg", "b1.jpg", "b2.jpg"]
    (tmp_path / "A" / "a2.jpg").unlink()
    second = run()
    assert second.returncode == 0 and "a2.jpg, there then, is missing now" in second.output
    assert paths() == ["a1.jpg", "b1.jpg", "b2.jpg"]
    assert json.loads((output / "report.json").read_text())["problem_counts"]["missing_image_file"] == 1
    (tmp_path / "B").rename(tmp_path / "B-elsewhere")
    (tmp_path / "B").mkdir()   # a mount point with nothing mounted on it
    third = run()
    assert third.returncode == 30, third.output
    assert f"[dataset] images: {tmp_path / 'B'} (entry 2) holds none of the 2 image files {tmp_path / 'B.json'} " \
        "names (first: b1.jpg). Fix: mount or correct that folder" in third.output
    assert paths() == ["a1.jpg", "b1.jpg", "b2.jpg"]   # the failed rerun left the previous output where it was


def test_another_image_folder_inside_the_workspace_gives_other_manifests(tmp_path):
    """Manifests name an image root inside the workspace by its path there: pointing [dataset] images at another
    such folder with the same caption file makes new manifests, never the old folder's."""
    for version in ("v1", "v2"):
        (tmp_path / "w" / version).mkdir(parents=True)
        (tmp_path / "w" / version / "a.jpg").write_bytes(version.encode())
    _, cfg = coco_setup(tmp_path, tmp_path / "w" / "v1", ["a.jpg"])
    roots = []
    for version in ("v1", "v2"):
        cfg.write_text(cfg.read_text().replace("/w/v1\n", f"/w/{version}\n"))
        run = run_luigi("ExtractAnnotations", config=cfg, workdir=tmp_path / "w", timeout=120)
        assert run.returncode == 0, run.output
        roots.append({json.loads(line)["root"] for d in (tmp_path / "w").glob("annotations/[!.]*")
                      for line in (d / "train.jsonl").open()})
    assert roots == [{"v1"}, {"v1", "v2"}]


@pytest.mark.parametrize("flags, needles", BAD_SETTINGS, ids=[f[0] for f, _ in BAD_SETTINGS])
def test_bad_settings_stop_before_any_work(tmp_path, flags, needles):
    run = run_luigi("EvaluateCaptions", *flags, workdir=tmp_path / "w")
    last = run.output.strip().splitlines()[-1]
    assert run.returncode == 35, run.output[-2000:]
    assert all(n in last for n in needles), last
    assert not (tmp_path / "w" / "demo").exists()                               # nothing ran


def test_typos_in_config_and_flags_are_refused_together_before_any_work(tmp_path):
    cfg = tmp_path / "typo.cfg"
    cfg.write_text(TEST_CONFIG.read_text().replace("[training]\n", "[training]\nbatchsize = 8\n")
                   + "\n[trainng]\nepochs = 3\n")
    run = run_luigi("EvaluateCaptions", "--split", "tset", "--trainig-epochs", "3", config=cfg,
                    workdir=tmp_path / "w", timeout=60)
    assert run.returncode == 35, run.output
    errors = [line for line in run.output.splitlines() if line.startswith("captioner: ERROR:")]
    assert len(errors) == 4                                                   # every problem, at once
    assert f"{cfg}: [training] batchsize: unknown key (did you mean batch_size?)" in errors[0]
    assert f"{cfg}: [trainng]: unknown section (did you mean [training]?)" in errors[1]
    assert "--split tset: EvaluateCaptions needs one of test, train, val (did you mean test?)" in errors[2]
    assert "--trainig-epochs: unknown flag (did you mean --training-epochs?)" in errors[3]
    assert "Traceback" not in run.output and not (tmp_path / "w").exists()  # nothing started
    misspelt = run_luigi("EvaluateCaption", "--split", "test", config=TEST_CONFIG, workdir=tmp_path / "w", timeout=60)
    assert misspelt.returncode == 35 and [line for line in misspelt.output.splitlines() if "ERROR" in line] == [
        "captioner: ERROR: EvaluateCaption: unknown task (did you mean EvaluateCaptions?)."]   # not its flags too


def test_missing_dataset_paths_are_refused_before_any_work(tmp_path):
    coco, cfg = coco_setup(tmp_path, tmp_path / "no-such-images", [])
    cfg.write_text(cfg.read_text().replace(f"annotations = {coco}", f"annotations = {tmp_path / 'nope.json'}"))
    run = run_luigi("BuildVocabulary", config=cfg, workdir=tmp_path / "w", timeout=60)
    assert run.returncode == 35, run.output
    assert "[dataset] annotations = " in run.output and "nope.json, which is not a file" in run.output
    assert "no-such-images, which is not a directory" in run.output         # both problems in one run
    assert not list((tmp_path / "w").glob("annotations/*"))


def test_your_files_without_source_coco_are_refused_not_swapped_for_the_demo(tmp_path):
    """A config naming caption files but leaving [dataset] source at its default (demo) would train on the demo's
    digits and never read them: it stops before any work, naming each key and the fix."""
    coco, cfg = coco_setup(tmp_path, tmp_path / "images", [])
    cfg.write_text(cfg.read_text().replace("source = coco\n", ""))
    run = run_luigi("BuildVocabulary", config=cfg, workdir=tmp_path / "w", timeout=60)
    assert run.returncode == 35, run.output
    errors = [line for line in run.output.splitlines() if line.startswith("captioner: ERROR:")]
    for key in ("annotations", "images"):
        assert any(f"[dataset] {key} = " in e and "but source = demo reads the dataset its plug-in writes" in e
                   and "set source = coco" in e for e in errors), errors
    assert not (tmp_path / "w").exists()


def test_split_fractions_beside_a_karpathy_split_are_refused_not_ignored(tmp_path):
    """The split file decides every image's split: fractions and a seed the user set beside it (in their file or
    as a flag) would be dropped without a word, so the run stops first, naming each, where it was set, and the fix.
    The project's defaults (configs/luigi.cfg sets them for every run) are not the user's choice."""
    (tmp_path / "images").mkdir()
    coco, cfg = coco_setup(tmp_path, tmp_path / "images", [], val_fraction=0.1)
    split = tmp_path / "dataset_coco.json"
    split.write_text(json.dumps({"images": []}))
    cfg.write_text(cfg.read_text().replace("test_fraction = 0", f"test_fraction = 0\nkarpathy_split = {split}"))
    run = run_luigi("BuildVocabulary", "--dataset-seed", "3", config=cfg, workdir=tmp_path / "w", timeout=60)
    assert run.returncode == 35, run.output
    errors = [line for line in run.output.splitlines() if line.startswith("captioner: ERROR:")]
    for key, value, where in (("val_fraction", "0.1", f"file {cfg}"), ("test_fraction", "0", f"file {cfg}"),
                              ("seed", "3", "flag --dataset-seed")):
        assert any(f"[dataset] {key} = {value} ({where}) is never read: karpathy_split = {split}" in e
                   and f"Fix: remove {key}, or empty karpathy_split" in e for e in errors), (key, errors)
    assert not (tmp_path / "w").exists()


def test_a_config_holds_only_what_it_changes(tmp_path):
    """A user's file is layered on configs/luigi.cfg (and configs/demo.cfg for the demo): a few lines run on the
    project's defaults, with its local scheduler and exit codes, and the values it sets win."""
    cfg = tmp_path / "mine.cfg"
    cfg.write_text("[demo]\ntrain_images = 3\nval_images = 1\ntest_images = 1\n[training]\nepochs = 2\n")
    run = run_luigi("BuildVocabulary", config=cfg, workdir=tmp_path / "w", timeout=120)
    assert run.returncode == 0, run.output
    assert "localhost:8082" not in run.output and "remote scheduler" not in run.output.lower()
    annotations, = (tmp_path / "w").glob("annotations/[!.]*")
    assert sum(1 for _ in (annotations / "train.jsonl").open()) == 3             # this file's [demo] setting
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(cfg))
    shown = subprocess.run([str(Path(sys.executable).with_name("captioner")), "settings", "--json"], env=env,
                           cwd=REPO, capture_output=True, text=True)
    rows = {(r["section"], r["key"]): r for r in json.loads(shown.stdout)}
    assert rows[("training", "epochs")]["source"] == f"file {cfg}" and rows[("training", "epochs")]["value"] == "2"
    assert rows[("encoder", "weights")]["value"] == "digits"                       # the demo's, underneath


def test_a_missing_config_file_or_an_abbreviated_flag_stops_at_once(tmp_path):
    start = time.monotonic()
    missing = run_luigi("TrainDecoder", config=tmp_path / "nope.cfg", workdir=tmp_path / "w", timeout=60)
    assert missing.returncode == 35 and time.monotonic() - start <= 20, missing.output
    last = missing.output.strip().splitlines()[-1]
    assert str(tmp_path / "nope.cfg") in last and "does not exist" in last
    abbreviated = run_luigi("TrainDecoder", "--training-epoch", "3", workdir=tmp_path / "w", timeout=60)
    assert abbreviated.returncode == 35, abbreviated.output
    assert "--training-epoch: not a full flag name (did you mean --training-epochs?)" in abbreviated.output
    assert not (tmp_path / "w").exists()                                              # nothing ran


def test_plug_in_settings_are_refused_without_the_plug_in_or_its_truth(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"x")
    coco, cfg = coco_setup(tmp_path, images, ["a.jpg"])
    cfg.write_text(cfg.read_text().replace("select_by = cider", "select_by = digits_exact"))
    run = run_luigi("BuildVocabulary", config=cfg, workdir=tmp_path / "w", timeout=60)   # no plug-in offers it
    assert run.returncode == 35 and "select_by = 'digits_exact' must be one of cider" in run.output, run.output
    run = run_luigi("BuildVocabulary", "--training-select-by", "cider", "--encoder-layer", "mixed7+cell_scores",
                    config=cfg, workdir=tmp_path / "w", timeout=60)
    assert run.returncode == 35, run.output
    assert "appends 'cell_scores', which no plug-in of [dataset] plugins offers" in run.output, run.output
    run = run_luigi("BuildVocabulary", "--dataset-plugins", "pipeline.digits", config=cfg, workdir=tmp_path / "w",
                    timeout=60)   # the plug-in offers it, and no image carries "digits"
    assert run.returncode == 35, run.output
    assert "select_by = digits_exact needs per-image truth" in run.output and '"digits"' in run.output, run.output



def test_caption_images_refuses_a_file_or_an_empty_folder_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one.jpg").write_bytes(b"not even an image")
    for given, needle in ((tmp_path / "empty", "no image files in it"), (tmp_path / "one.jpg", "is a file")):
        run = run_luigi("CaptionImages", "--images", str(given), workdir=tmp_path / "w", timeout=120)
        assert run.returncode == 35, run.output[-2000:]
        last = run.output.strip().splitlines()[-1]
        assert f"--images {given}: {needle}" in last and "Fix:" in last
    assert {p.name for p in (tmp_path / "w").iterdir()} <= {".locks", "runs"}          # nothing computed
