"""The built-in digits encoder: pretraining data and targets, and the PretrainDigitsEncoder stage end to end."""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.digits import demo, pretrain, scenes as scene_lib
from cli import main as cli
from pipeline.encoder import grid_size
from storage import workspace as ws
from storage.weights import CELL_HEAD_FILE, read_cell_head
from tests.conftest import run_luigi


def test_cell_labels_mark_the_digit_under_each_cell_centre():
    # a 107-px crop has a 2×2 mixed10 grid with centres at 37.5 and 69.5 px
    assert grid_size(107) == 2
    labels = scene_lib.cell_labels([(60, 0, 20, 50, 7)], 0, 0, 107, "mixed10")   # covers x 60–80, y 0–50
    np.testing.assert_array_equal(labels, [[10, 7], [10, 10]])
    # the same box seen from a crop shifted 30 px right lands under the left column
    labels = scene_lib.cell_labels([(60, 0, 20, 50, 7)], 30, 0, 107, "mixed10")
    np.testing.assert_array_equal(labels, [[7, 10], [10, 10]])
    # mixed7: a 75-px crop has 3×3 cells centred at 21.5, 37.5 and 53.5 px; x 30–45, y 0–40 holds two of them
    np.testing.assert_array_equal(scene_lib.cell_labels([(30, 0, 15, 40, 2)], 0, 0, 75, "mixed7"),
                                  [[10, 2, 10], [10, 2, 10], [10, 10, 10]])


def test_pretraining_sees_only_the_demo_train_pool(tmp_path):
    pools = scene_lib.pools(5)
    assert not set(pools["train"]) & (set(pools["val"]) | set(pools["test"]))
    demo.write_demo_dataset(tmp_path, 20, 5, 5, seed=5)
    for split in ("train", "val", "test"):
        images = json.loads((tmp_path / f"captions_{split}.json").read_text())["images"]
        used = {k for image in images for k in image["digit_samples"]}
        assert used <= set(pools[split].tolist())                # the demo draws each split from its own pool
        assert all(len(image["digit_boxes"]) == len(image["digits"]) for image in images)


def test_cell_labels_follow_a_resized_window():
    # a 150-px scene window shown at 75 px: the single cell's centre is scene pixel (x0 + 75, y0 + 75)
    box = [(100, 100, 40, 40, 3)]
    assert scene_lib.cell_labels(box, 30, 30, 75, "mixed10", scale=2.0).tolist() == [[3]]
    assert scene_lib.cell_labels(box, 0, 0, 75, "mixed10", scale=2.0).tolist() == [[10]]


def test_scene_labels_give_every_digit_a_cell():
    # cell centres of a 299-px scene: 37.5 + 32k. A 20-px-wide digit at x 42–62 contains no centre column
    # (37.5, 69.5): it still labels its nearest cell, and only that one
    labels = scene_lib.scene_labels([(42, 100, 20, 80, 4), (200, 20, 60, 60, 9)], 299, "mixed10")
    assert labels.shape == (8, 8)
    assert labels[3, 0] == 4 and (labels == 4).sum() == 1             # centre (52, 140): row 3 (133.5)
    assert scene_lib.cell_labels([(42, 100, 20, 80, 4)], 0, 0, 299, "mixed10").max() == pretrain.BACKGROUND
    # x 200–260 holds column 6's centre (229.5), y 20–80 rows 0 and 1 (37.5, 69.5)
    assert np.argwhere(labels == 9).tolist() == [[0, 6], [1, 6]]
    # mixed7's 17×17 cells, centred on 21.5 + 16k: x 42–62 holds column 2 (53.5), y 100–180 rows 5–9
    fine = scene_lib.scene_labels([(42, 100, 20, 80, 4)], 299, "mixed7")
    assert fine.shape == (17, 17) and np.argwhere(fine == 4).tolist() == [[r, 2] for r in range(5, 10)]


def test_read_digit_sums_the_probabilities_of_the_cells_in_the_box():
    # mixed10's 8×8 cells of a 299-px scene; the box x 200–260, y 20–80 holds cells (0, 6) and (1, 6)
    logits = np.zeros((8, 8, 11), np.float32)
    logits[0, 6, 3] = 5.0                       # one cell sure of a 3
    logits[1, 6, [7, 8]] = 3.0                  # the other torn between 7 and 8: 3 wins the sum
    logits[2, 6, 1] = 9.0                       # outside the box: ignored
    box = (200, 20, 60, 60, 3)
    assert scene_lib.read_digit(logits, box, "mixed10") == 3
    logits[1, 6, 7] = 8.0                       # now the second cell is surer of a 7 than the first of a 3
    assert scene_lib.read_digit(logits, box, "mixed10") == 7
    # background scores do not count: a box whose cells say background still reads its likeliest digit
    logits[0, 6, pretrain.BACKGROUND] = logits[1, 6, pretrain.BACKGROUND] = 20.0
    assert scene_lib.read_digit(logits, box, "mixed10") == 7
    # a box too narrow to hold a cell centre (x 42–62) reads its nearest cell, (3, 0)
    logits[3, 0, 5] = 4.0
    assert scene_lib.read_digit(logits, (42, 100, 20, 80, 5), "mixed10") == 5


def test_scene_batches_are_whole_scenes_with_every_digit_labelled():
    scenes, labels, centres = next(scene_lib.scene_batches(0, scene_lib.pools(1797)["train"], 6, 299, "mixed10"))
    assert scenes.shape == (6, 299, 299, 3) and scenes.dtype == np.uint8 and labels.shape == (6, 8, 8)
    assert all(1 <= len(set(row[row != pretrain.BACKGROUND].tolist())) <= 4 for row in labels.reshape(6, -1))
    # one centre cell per digit (two digits may share one on the coarse grid), and it lies on its digit's cells
    assert centres.shape == (6, 8, 8) and all(1 <= c.sum() <= 4 for c in centres)
    assert (labels[centres == 1] != pretrain.BACKGROUND).all()


def test_centre_cells_mark_each_digit_once_even_two_alike_side_by_side():
    # two 7s side by side on mixed7's 17×17 grid (cells centred on 21.5 + 16k): one run of "7" cells (columns
    # 1–7), two centres (x 50 → column 2, x 110 → column 6; y 140 → row 7)
    boxes = [(20, 100, 60, 80, 7), (80, 100, 60, 80, 7)]
    labels = scene_lib.scene_labels(boxes, 299, "mixed7")
    centres = scene_lib.centre_cells(boxes, 299, "mixed7")
    assert np.argwhere(centres == 1).tolist() == [[7, 2], [7, 6]]
    assert set(labels[7, 1:8].tolist()) == {7}
    # count_centres finds them from logits: peaks above probability 0.5, one per 3×3 neighbourhood
    logits = np.full((17, 17), -5.0)
    logits[7, 2], logits[7, 3], logits[7, 6] = 3.0, 1.0, 2.0    # (7, 3) is above 0.5 but beside a higher peak
    assert pretrain.count_centres(logits) == 2
    logits[7, 6] = -1.0
    assert pretrain.count_centres(logits) == 1


@pytest.mark.parametrize("position_weight", [0.0, 1.0])
def test_the_scene_phase_learns_from_whole_labelled_scenes(position_weight):
    """pretrain._fit on scene_batches, as phase 2 runs it, with a small stand-in for InceptionV3: 299-px uint8
    scenes → (8, 8, 12) cell logits (classes, centre; 14 with the cells' rows and columns), background cells
    weighted down."""
    import keras
    keras.utils.set_random_seed(0)
    images = keras.Input((299, 299, 3), dtype="uint8")
    cells = keras.layers.AveragePooling2D(75, strides=32)(keras.ops.cast(images, "float32") / 255.0)   # 8×8
    outputs = pretrain.POSITION + (2 if position_weight else 0)
    model = keras.Model(images, keras.layers.Conv2D(outputs, 1)(cells))
    batches = scene_lib.scene_batches(0, scene_lib.pools(1797)["train"], 8, 299, "mixed10")
    settings = {**pretrain.DEFAULTS, "learning_rate": 0.05, "warmup_steps": 1}
    losses = pretrain._fit(model, batches, 12, settings, "scenes", pretrain.BACKGROUND_WEIGHT, None, position_weight)
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_cell_positions_run_from_minus_one_to_one_over_rows_and_columns():
    where = pretrain.cell_positions(3)
    assert where.shape == (3, 3, 2) and where.dtype == np.float32
    assert where[0, 2].tolist() == [-1.0, 1.0] and where[1, 0].tolist() == [0.0, -1.0]


def test_scene_train_from_keeps_the_layers_below_that_block():
    """[pretrain] scene_train_from = mixed3: a phase-2 step on real InceptionV3 changes mixed3 and above, never a
    weight (or batch-norm statistic) below it."""
    import keras
    keras.utils.set_random_seed(0)
    base, model = pretrain.build_classifier(75, "mixed7")
    pretrain.freeze_below(base, "mixed3")
    names = [layer.name for layer in base.layers]
    below = [w for layer in base.layers[:names.index("mixed3")] for w in layer.weights]
    above = [w for layer in base.layers[names.index("mixed3"):] for w in layer.trainable_weights]
    assert below and above
    before = [w.numpy().copy() for w in below + above]
    batches = scene_lib.crop_batches(0, scene_lib.pools(1797)["train"], {**pretrain.DEFAULTS, "layer": "mixed7",
                                                                        "batch_size": 4})
    pretrain._fit(model, batches, 2, {**pretrain.DEFAULTS, "warmup_steps": 0}, "scenes", 1.0, None)
    after = [w.numpy() for w in below + above]
    assert all(np.array_equal(b, a) for b, a in zip(before[:len(below)], after[:len(below)]))
    assert sum(not np.array_equal(b, a) for b, a in zip(before[len(below):], after[len(below):])) > len(above) // 2

    # the batch-norm re-estimation leaves the frozen layers' statistics too: the blocks above trained on them
    settings = {**pretrain.DEFAULTS, "layer": "mixed7", "scene_size": 75, "bn_scenes": 16}
    scene = pretrain.recalibrate_batchnorm(base, scene_lib.pools(1797)["train"], settings, "mixed3")
    stats = lambda model: [(layer.name, layer.moving_mean.numpy()) for layer in model.layers
                           if isinstance(layer, keras.layers.BatchNormalization)]
    frozen = set(names[:names.index("mixed3")])
    used = set(names[:names.index("mixed7")])   # the blocks above the feature layer are never run
    for (name, old), (_, new) in zip(stats(base), stats(scene)):
        if name in used:
            assert np.array_equal(old, new) == (name in frozen), name


@pytest.mark.parametrize("crop,layer", [(75, "mixed10"), (107, "mixed10"), (75, "mixed7")])
def test_crops_frame_digits_and_background(crop, layer):
    settings = {**pretrain.DEFAULTS, "batch_size": 96, "crop": crop, "layer": layer}
    crops, labels = next(scene_lib.crop_batches(0, scene_lib.pools(1797)["train"], settings))
    g = grid_size(crop, layer)
    assert crops.shape == (96, crop, crop, 3) and crops.dtype == np.uint8
    assert labels.shape == (96, g, g)
    share = float(np.mean(labels != pretrain.BACKGROUND))
    assert 0.3 < share < 0.98                                     # digits and background both taught
    assert len(set(labels[labels != pretrain.BACKGROUND].tolist())) >= 8


def test_digits_encoder_stage_feeds_the_shards_and_is_reused(workdir):
    # the scene phase on 107-px scenes ([pretrain] scene_train_size: cheaper steps), the batch norms re-estimated
    # and the report read at the encoder's 299 px, where the saved network extracts the features
    args = ["--split", "val", "--encoder-weights", "digits", "--encoder-layer", "mixed7", "--pretrain-bn-scenes", "16",
            "--pretrain-steps", "3", "--pretrain-batch-size", "4", "--pretrain-scene-steps", "2",
            "--pretrain-scene-batch-size", "2", "--pretrain-scene-train-size", "107", "--pretrain-val-scenes", "16",
            "--pretrain-position-weight", "1"]
    first = run_luigi("ExtractFeatures", *args, workdir=workdir)
    assert first.returncode == 0, first.output
    (encoder_dir,) = (workdir / "encoders").iterdir()
    weights = encoder_dir / pretrain.WEIGHTS_FILE
    report = json.loads((encoder_dir / "report.json").read_text())
    assert report["settings"]["steps"] == 3 and "never ImageNet" in report["pretrained_on"]
    assert report["settings"]["layer"] == "mixed7" and "mixed7 cell" in report["task"]
    assert report["held_out"]["pool"] == "val"
    for phase in ("crops", "scenes"):
        assert 0 <= report["held_out"][phase]["digit_cells"] <= 1 and report["held_out"][phase]["digit_cell_count"]
    for kind in ("scenes", "varied_scenes", "yardstick_scenes"):   # the last drawn by pipeline/digits/yardstick.py
        scenes = report["held_out"][kind]
        assert 0 <= scenes["scenes_all_digits_right"] <= scenes["digits"] <= 1, kind
        assert scenes["digits_read"] >= scenes["scenes"] == 16, kind
        assert 0 <= scenes["scenes_counted_by_centres"] <= 1 and 0 <= scenes["cells_placed"] <= 1, kind
        read = [v for v in scenes["by_digit"].values() if v is not None]
        assert set(scenes["by_digit"]) == {str(d) for d in range(10)} and read and all(0 <= v <= 1 for v in read)
    assert "whole 107-px scenes" in report["task"] and "where they lie" in report["task"]
    assert len(report["final_loss"]) == 2
    assert all(np.isfinite(loss) for loss in report["final_loss"].values())
    provenance = json.loads((encoder_dir / "provenance.json").read_text())
    assert provenance["fingerprint"] == encoder_dir.name
    shards = sorted(workdir.glob("features/*/shard-*.h5"))
    assert shards
    for shard in shards:
        with h5py.File(shard) as f:
            assert f.attrs["weights"] == "digits" and f.attrs["stage"] == encoder_dir.name
            assert f.attrs["weights_sha256"] == ws.file_sha256(weights)
            assert "scikit-learn" in f.attrs["pretrained_on"] and "not ImageNet" in f.attrs["pretrained_on"]
            assert f.attrs["layer"] == "mixed7" and f.attrs["encoder"].endswith("/mixed7")
            features = f["features"][:].astype(np.float32)
            assert features.shape[1:] == (17 * 17, 768) and np.isfinite(features).all()
            # batch norms re-estimated on scenes: activations at the scale they were normalised to, not
            # the thousands a crop-trained network gives on a 299-px scene
            assert 0 < features.mean() < 10

    # the per-cell head is saved beside the weights; mixed7+cell_scores appends its scores to the same encoder's
    # mixed7 features (no second pretraining: it trains the base layer), in a store of its own
    kernel, bias, layer = read_cell_head(encoder_dir / CELL_HEAD_FILE)
    assert kernel.shape == (768, 12) and bias.shape == (12,) and layer == "mixed7"   # 11 classes, the centre
    scored = run_luigi("ExtractFeatures", *args[:4], "--encoder-layer", "mixed7+cell_scores", *args[6:],
                       workdir=workdir)
    assert scored.returncode == 0, scored.output
    assert len(list((workdir / "encoders").iterdir())) == 1 and len(list((workdir / "features").iterdir())) == 2
    (scored_shard, *_) = [p for p in sorted(workdir.glob("features/*/shard-*.h5")) if p not in shards]
    with h5py.File(scored_shard) as f, h5py.File(shards[0]) as plain:
        assert f.attrs["layer"] == "mixed7+cell_scores" and f.attrs["encoder"].endswith("/mixed7+cell_scores")
        assert f.attrs["extra_sha256"] == ws.file_sha256(encoder_dir / CELL_HEAD_FILE)
        features = f["features"][:].astype(np.float32)
        assert features.shape[1:] == (17 * 17, 768 + 12)
        np.testing.assert_array_equal(features[..., :768], plain["features"][:].astype(np.float32))
        logits = features[..., :768] @ kernel + bias
        expected = np.exp(logits[..., :11] - logits[..., :11].max(-1, keepdims=True))
        np.testing.assert_allclose(features[..., 768:779], expected / expected.sum(-1, keepdims=True), atol=0.01)
        np.testing.assert_allclose(features[..., 779], 1 / (1 + np.exp(-logits[..., 11])), atol=0.01)

    # a decoder whose attention keys come from the scores and whose context reads them too (the demo's
    # settings), and captioning a new image with it (the CLI rebuilds the encoder, head included, from the
    # model's provenance)
    trained = run_luigi("TrainDecoder", *args[2:4], "--encoder-layer", "mixed7+cell_scores", *args[6:],
                        "--decoder-attention-keys", "extras", "--decoder-context-extras", "true",
                        workdir=workdir)
    assert trained.returncode == 0, trained.output
    (model_dir,) = workdir.glob("models/[!.]*")
    decoder_config = json.loads((model_dir / "decoder.json").read_text())
    assert decoder_config["key_channels"] == 12 and decoder_config["context_extras"] is True
    image = sorted(workdir.glob("demo/*/test/*.jpg"))[0]
    captioned = CliRunner().invoke(cli, ["caption", str(image), "--model", str(model_dir), "--json"])
    assert captioned.exit_code == 0, captioned.output
    assert json.loads(captioned.stdout)[0]["caption"]

    mtime = weights.stat().st_mtime_ns
    again = run_luigi("ExtractFeatures", *args, workdir=workdir)
    assert again.returncode == 0, again.output
    assert "ran successfully" not in again.output
    assert weights.stat().st_mtime_ns == mtime
    # another pretraining setting is another encoder: a new weights directory and a new feature store
    other = run_luigi("PlanShards", "--encoder-weights", "digits", "--pretrain-steps", "4", workdir=workdir)
    assert other.returncode == 0, other.output
    assert len(list((workdir / "features").iterdir())) == 3


def _varied_scenes(n, seed=0):
    """n varied scenes at their own size: [(image (H, W, 3), boxes [(x, y, w, h)], coverage (H, W))], the
    coverage drawn with the same generator state as render_varied's."""
    digits, pool = demo.load_digits(), scene_lib.pools(1797)["train"]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        samples = rng.choice(pool, size=int(rng.integers(1, 5))).tolist()
        state = rng.bit_generator.state
        image, boxes = scene_lib.render_varied(rng, digits.images, samples)
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        glyphs = [scene_lib.glyph_ink(digits.images[k]) for k in samples]
        width, height, again = scene_lib.varied_layout(replay, glyphs)
        replay.uniform(size=7)   # grey, tint (3), hue, saturation, value: render_varied's draws before the glyphs
        assert again == boxes and image.shape == (height, width, 3)
        out.append((image, boxes, scene_lib.glyph_coverage(replay, glyphs, width, height, boxes)))
    return out


def test_varied_scenes_span_sizes_aspects_glyph_widths_and_backgrounds():
    scenes = _varied_scenes(120)
    heights, aspects, glyph_widths, backgrounds, contrasts = [], [], [], [], []
    for image, boxes, coverage in scenes:
        height, width = image.shape[:2]
        aspects.append(width / height)
        luminance = image.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
        outside = np.ones((height, width), bool)
        for x, y, w, h in boxes:
            assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
            heights.append(h / height)
            glyph_widths.append(w / h)
            outside[y:y + h, x:x + w] = False
        for k, (x, y, w, h) in enumerate(boxes):       # glyphs apart
            for bx, by, bw, bh in boxes[k + 1:]:
                assert x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y
        backgrounds.append(float(np.median(luminance[outside])))
        inked = coverage > 0.7
        if inked.any():
            contrasts.append(backgrounds[-1] - float(np.median(luminance[inked])))
    heights, aspects, glyph_widths = map(np.asarray, (heights, aspects, glyph_widths))
    # digit height: about a tenth to most of the image height (a glyph shrinks only when the digits do not fit)
    assert heights.max() <= 0.98 and np.quantile(heights, 0.05) >= 0.04
    assert (heights < 0.15).any() and (heights > 0.6).any()
    # aspect 1:2 to 3:1, both ends reached
    assert aspects.min() >= 0.44 and aspects.max() <= 3.35
    assert (aspects < 0.6).any() and (aspects > 2.5).any()
    # narrow and square glyphs
    assert (glyph_widths < 0.35).any() and (glyph_widths > 0.9).any()
    # mid-grey to white backgrounds, dark ink on every one of them
    assert min(backgrounds) >= 85 and max(backgrounds) <= 255
    assert min(backgrounds) < 140 and max(backgrounds) > 230
    assert min(contrasts) > 25
    # 1–4 digits
    assert {len(boxes) for _, boxes, _ in scenes} == {1, 2, 3, 4}


def test_varied_boxes_hold_all_the_ink_and_label_their_cells():
    for image, boxes, coverage in _varied_scenes(40, seed=1):
        inside = np.zeros(coverage.shape, bool)
        for x, y, w, h in boxes:
            inside[y:y + h, x:x + w] = True
            assert coverage[y:y + h, x:x + w].max() > 0.3          # every box holds its glyph
        assert not coverage[~inside].any()                         # and no ink lies outside the boxes
    # resized to the encoder's square input, every digit labels the cells whose centres lie in its box, or its
    # nearest cell, and no cell outside its box
    digits, pool = demo.load_digits(), scene_lib.pools(1797)["train"]
    rng = np.random.default_rng(2)
    centres = scene_lib.cell_centres(17, "mixed7")
    for _ in range(40):
        scene, boxes = scene_lib.render_scene(rng, digits.images, digits.target, pool, 299, varied=1.0)
        assert scene.shape == (299, 299, 3)
        labels = scene_lib.scene_labels(boxes, 299, "mixed7")
        for x, y, w, h, label in boxes:
            assert 0 <= x and x + w <= 299.01 and 0 <= y and y + h <= 299.01
            assert label in labels
        for row, col in np.argwhere(labels != pretrain.BACKGROUND):
            near = [(x, y, w, h) for x, y, w, h, label in boxes if label == labels[row, col]]
            assert any(x - 16 <= centres[col] <= x + w + 16 and y - 16 <= centres[row] <= y + h + 16
                       for x, y, w, h in near)


def test_pretraining_scenes_are_seeded_and_mix_both_renderers():
    pool = scene_lib.pools(1797)["train"]
    first = next(scene_lib.scene_batches(4, pool, 12, 299, "mixed7"))
    again = next(scene_lib.scene_batches(4, pool, 12, 299, "mixed7"))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    demo_only = next(scene_lib.scene_batches(4, pool, 12, 299, "mixed7", varied=0.0))
    assert not np.array_equal(first[0], demo_only[0])
    # a share of varied_fraction varied scenes, the rest the demo's
    calls = []
    render = scene_lib.render_varied
    try:
        scene_lib.render_varied = lambda *args: calls.append(1) or render(*args)
        next(scene_lib.scene_batches(4, pool, 90, 299, "mixed7", varied=2 / 3))
    finally:
        scene_lib.render_varied = render
    assert 45 <= len(calls) <= 75


def test_yardstick_scenes_are_seeded_and_their_boxes_hold_the_ink():
    """The report's yardstick scenes: the same seed draws the same scenes, and each box lies inside the squashed
    image around darker pixels than the background around it."""
    pool = scene_lib.pools(1797)["val"]
    first = next(scene_lib.labelled_scenes(3, pool, 4, 299, "mixed7", renderer="yardstick"))
    again = next(scene_lib.labelled_scenes(3, pool, 4, 299, "mixed7", renderer="yardstick"))
    assert np.array_equal(first[0], again[0]) and first[2] == again[2]
    images, labels, boxes = first
    assert images.shape == (4, 299, 299, 3) and labels.shape == (4, 17, 17)
    for image, scene_boxes in zip(images, boxes):
        grey = image.astype(np.float32).mean(-1)
        for x, y, w, h, label in scene_boxes:
            assert 0 <= x and 0 <= y and x + w <= 299.5 and y + h <= 299.5 and 0 <= label <= 9
            inside = grey[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))]
            assert inside.min() < np.median(grey) - 20   # ink in the box


def test_scene_train_size_is_checked_and_a_failed_render_stops_the_pretraining(tmp_path):
    """[pretrain] scene_train_size below the crop window is a config problem. An error while rendering a phase's
    batches stops the pretraining (not a wait for ever on batches that never come). (The scene phase on smaller
    scenes itself: test_digits_encoder_stage_feeds_the_shards_and_is_reused.)"""
    from tasks.demo import pretrain as section
    assert section(scene_train_size=50).problems() and not section(scene_train_size=75).problems()
    settings = {"layer": "mixed7", "scene_size": 107, "steps": 1, "batch_size": 2, "scene_steps": 2,
                "scene_batch_size": 2, "warmup_steps": 0}
    with pytest.raises(ValueError):   # a 107-px scene cannot hold the crop phase's windows
        pretrain.pretrain(tmp_path, settings)


def test_scene_train_size_zero_reaches_the_pretraining_as_the_encoders_image_size():
    """0 means phase 2 trains on scenes of [encoder] image_size: the stage passes it on (and fingerprints it),
    rather than dropping the key and letting another default train in its place."""
    from luigi.cmdline_parser import CmdlineParser
    from tasks.demo import PretrainDigitsEncoder
    with CmdlineParser.global_instance(["PretrainDigitsEncoder", "--pretrain-scene-train-size", "0"]):
        asked = PretrainDigitsEncoder()
        settings, path = asked.settings(), asked.output().path
    assert {**pretrain.DEFAULTS, **settings}["scene_train_size"] == 0     # what pretrain() resolves to scene_size
    PretrainDigitsEncoder.clear_instance_cache()       # luigi hands out one instance per parameters
    configured = PretrainDigitsEncoder()
    assert configured.settings()["scene_train_size"] == 224                  # the demo's (configs/demo.cfg)
    assert configured.output().path != path                                 # another encoder
