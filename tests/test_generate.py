"""Decoding, metrics, reports and the captioning CLI."""
import json

import h5py
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from cli import main as cli
from pipeline.decode import beam_fn, greedy_fn
from pipeline.errors import InputError
from pipeline.evaluate import evaluate, java_available
from pipeline.model import ShowAttendTell
from storage import contents, manifests, shards, workspace as ws
from tests.conftest import assert_real_picture, captioner_log, run_luigi

PAD, START, END, A, B, C = range(6)


def bigram_model(transitions: np.ndarray) -> ShowAttendTell:
    """A decoder whose next-word distribution depends only on the previous word: embedding = identity,
    deep-output contributions of h and z = 0, logits = log transitions[previous word]."""
    v = len(transitions)
    model = ShowAttendTell(v, feature_dim=4, attention_dim=4, embed_dim=v, units=4, dropout=0.0, feature_channels=8)
    model(tf.zeros((1, 4, 8)), tf.zeros((1, 1), tf.int32))
    model.embed.embeddings.assign(np.eye(v, dtype=np.float32))
    model.out_h.kernel.assign(np.zeros_like(model.out_h.kernel.numpy()))
    model.out_h.bias.assign(np.zeros_like(model.out_h.bias.numpy()))
    model.out_z.kernel.assign(np.zeros_like(model.out_z.kernel.numpy()))
    model.logits.kernel.assign(np.log(transitions).astype(np.float32))
    model.logits.bias.assign(np.zeros(v, np.float32))
    return model


def transitions():
    t = np.full((6, 6), 1e-6)
    t[START, A], t[START, B] = 0.6, 0.4          # greedy takes A ...
    t[A, END], t[A, C] = 0.55, 0.45               # ... then ends: p = 0.33
    t[B, END] = 1.0                               # the best caption is B <end>: p = 0.4
    t[C, END] = 1.0
    t[PAD, PAD] = t[END, PAD] = 1.0
    return t / t.sum(1, keepdims=True)


def test_beam_search_finds_the_best_sequence_that_greedy_misses():
    model = bigram_model(transitions())
    features = tf.zeros((2, 4, 8))
    greedy, _ = greedy_fn(model, 5, START, END)(features)
    beam, _, score = beam_fn(model, 3, 5, START, END, length_penalty=0.0)(features)
    assert greedy.numpy()[0].tolist() == [A, END, PAD, PAD, PAD]
    assert beam.numpy().tolist() == [[B, END, PAD, PAD, PAD]] * 2
    assert score.numpy()[0] == pytest.approx(np.log(transitions()[START, B]), abs=1e-4)


def test_beam_one_is_exactly_greedy():
    tf.keras.utils.set_random_seed(4)
    model = ShowAttendTell(30, feature_dim=16, attention_dim=8, embed_dim=8, units=12, dropout=0.0,
                           feature_channels=20)
    features = tf.random.stateless_normal((6, 10, 20), seed=(7, 8))
    model(features, tf.zeros((6, 1), tf.int32))
    greedy_tokens, greedy_alphas = greedy_fn(model, 12, 1, 2, unk_id=3)(features)
    beam_tokens, beam_alphas, _ = beam_fn(model, 1, 12, 1, 2, unk_id=3)(features)
    np.testing.assert_array_equal(greedy_tokens.numpy(), beam_tokens.numpy())
    np.testing.assert_allclose(greedy_alphas.numpy(), beam_alphas.numpy(), atol=1e-6)
    assert not (greedy_tokens.numpy() == 3).any()                # <unk> suppressed


REFS = {1: ["A man rides a horse on a beach.", "a person riding a brown horse", "Horse and rider near the sea."],
        2: ["Two dogs play in the snow", "a couple of dogs running through snow.", "Dogs playing outside"],
        3: ["A plate of food with broccoli.", "broccoli and rice on a white plate", "A meal on a plate."]}
HYPS = {1: "a man riding a horse on the beach", 2: "two dogs playing in the snow", 3: "a plate of food"}


@pytest.mark.skipif(not java_available(), reason="no Java on PATH: the PTB tokenizer and METEOR need it")
def test_metrics_equal_pycocoevalcap_own_computation_with_java():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = evaluate(REFS, HYPS, java=True)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in REFS.items()})
    res = tok.tokenize({i: [{"caption": c}] for i, c in HYPS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {**{f"Bleu_{n + 1}": bleu[n] for n in range(4)}, "METEOR": Meteor().compute_score(gts, res)[0],
                "ROUGE_L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}
    assert ours["tokenizer"] == "ptb"
    assert ours["corpus"] == pytest.approx(expected, rel=1e-9)
    assert set(ours["per_image"]) == {1, 2, 3} and all("CIDEr" in s for s in ours["per_image"].values())


def test_java_free_fallback_reports_meteor_unavailable():
    from pycocoevalcap.cider.cider import Cider

    ours = evaluate(REFS, HYPS, java=False)
    assert ours["corpus"]["METEOR"] is None and ours["tokenizer"] == "captioner-normalise"
    assert ours["notes"][0].startswith("Java not used ([evaluation] java = no)")   # chosen, not missing
    from pipeline.captions import normalize_caption
    gts = {i: [normalize_caption(c) for c in r] for i, r in REFS.items()}
    res = {i: [normalize_caption(c)] for i, c in HYPS.items()}
    assert ours["corpus"]["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert 0 < ours["corpus"]["Bleu_4"] <= 1


def test_java_required_but_absent_names_the_setting_and_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    java_available.cache_clear()   # tried once per process
    try:
        with pytest.raises(InputError, match=r"\[evaluation\] java = yes, but no `java` is on PATH. Fix: install"):
            evaluate(REFS, HYPS, java=True)
    finally:
        monkeypatch.undo()
        java_available.cache_clear()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("w")
    run = run_luigi("EvaluateCaptions", "--split", "test", workdir=workdir)
    assert run.returncode == 0, run.output
    return workdir, run.output


def test_generate_and_evaluate_outputs(evaluated):
    workdir, output = evaluated
    test_ids = {r["image_id"] for r in manifests.read_manifest(next(workdir.glob("annotations/*/test.jsonl")))}
    captions_dir, = workdir.glob("captions/*")
    results = json.loads((captions_dir / "test.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(test_ids)          # one entry per image
    assert all(set(r) == {"image_id", "caption", "score"} and isinstance(r["caption"], str) for r in results)
    with h5py.File(captions_dir / "test-attention.h5") as f:
        assert f["attention"].shape[0] == len(test_ids) and f["attention"].shape[2] == 64
        assert f["tokens"].shape == f["attention"].shape[:2]
    metrics_dir, = workdir.glob("metrics/*")
    metrics = json.loads((metrics_dir / "test.json").read_text())
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert key in metrics["corpus"]
    assert len(metrics["per_image"]) == len(test_ids)
    assert "CIDEr" in output and "Bleu_4" in output                              # the summary table in the log
    report = (metrics_dir / "test-report.html").read_text()
    assert report.count("<img") >= 2 * len(test_ids) and "Worst CIDEr-D first" in report
    model_dir, = workdir.glob("models/*")
    for about in (f"<th>model</th><td>{model_dir}</td>", "<th>decoding</th><td>beam 3,", "<th>evaluated</th>",
                  "<th>encoder</th><td>InceptionV3 (random", "<th>config</th>", "<th>CIDEr-D</th>"):
        assert about in report, about                                            # what was evaluated, when
    assert metrics["about"]["model"] == str(model_dir)
    assert "Best CIDEr-D first" in report and "Random sample" in report         # [evaluation] report_examples 2
    last = output.strip().splitlines()[-1]                                        # where the results are
    assert last.startswith("captioner: results: ")
    for path in (model_dir, captions_dir / "test.json", metrics_dir / "test.json", metrics_dir / "test-report.html"):
        assert str(path) in last, (path, last)
    for stage in ("ExtractAnnotations", "TrainDecoder", "EvaluateCaptions"):       # each stage says what it wrote
        assert f"{stage} wrote {workdir}" in output, stage
    status = CliRunner().invoke(cli, ["status", "--workspace", str(workdir)])
    assert status.exit_code == 0, status.output
    assert "model of this config (" in status.output and f"{model_dir} (trained" in status.output
    assert f"test  BLEU-4 {metrics['corpus']['Bleu_4']:.3f}" in status.output and "digits exact" in status.output
    again = run_luigi("EvaluateCaptions", "--split", "test", workdir=workdir)      # nothing to do: the same artifacts
    named = lambda line: sorted(line.split(": ", 2)[2].split(" · "))
    assert again.returncode == 0 and named(again.output.strip().splitlines()[-1]) == named(last)


def test_val_and_test_results_of_one_model_share_one_directory(evaluated):
    workdir, _ = evaluated
    captions_dir, = workdir.glob("captions/[!.]*")
    before = {p.name: p.stat().st_mtime_ns for p in captions_dir.iterdir()}
    run = run_luigi("EvaluateCaptions", "--split", "val", workdir=workdir)
    assert run.returncode == 0, run.output
    assert "2 ran successfully" in run.output                                    # val captions and metrics only
    assert [p.name for p in workdir.glob("captions/[!.]*")] == [captions_dir.name]
    assert {"val.json", "val-attention.h5", "test.json", "test-attention.h5"} <= {p.name for p in captions_dir.iterdir()}
    assert all(captions_dir.joinpath(name).stat().st_mtime_ns == t for name, t in before.items()
               if name.startswith("test"))                                         # the test split untouched
    metrics_dir, = workdir.glob("metrics/[!.]*")
    assert {"val.json", "val-report.html", "test.json", "test-report.html"} <= {p.name for p in metrics_dir.iterdir()}
    assert not ws.leftover_temporaries(workdir)


def test_training_writes_tensorboard_curves(evaluated):
    """Two epochs of training leave one TensorBoard run with the loss parts per step and val scores per epoch."""
    workdir, _ = evaluated
    events = list(workdir.glob("checkpoints/*/tensorboard/events.out.tfevents.*"))
    assert events
    steps = {}
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    for tag in ("train/loss", "train/xent", "train/attention", "train/learning_rate", "train/captions_per_second"):
        assert len(steps[tag]) >= 2 and steps[tag] == sorted(steps[tag]), tag      # one point per step
    history = json.loads(next(workdir.glob("models/*/history.json")).read_text())
    for tag in ("val/Bleu_4", "val/CIDEr-D", "val/distinct_captions", "val/digits_exact", "val/examples"):
        assert len(steps[tag]) == len(history), tag                                 # one point per epoch
    assert max(steps["train/loss"]) == max(steps["val/CIDEr-D"])                    # the same step axis


def test_caption_images_captions_a_folder_and_a_rerun_does_only_what_changed(evaluated, tmp_path):
    """CaptionImages: a nested folder with broken files is captioned (the broken ones skipped with a reason);
    an unchanged rerun does nothing; after 2 files are added and 1 changed, exactly those 3 are decoded, and the
    result still covers the whole folder, each image once. Pictures the encoder's store already holds (the
    dataset's train images) are not extracted again: features belong to contents."""
    import shutil
    from PIL import Image
    workdir, _ = evaluated
    demo_images = sorted(workdir.glob("demo/*/train/*.jpg"))
    folder = tmp_path / "inbox"
    (folder / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(demo_images[0], folder / "a.jpg")
    shutil.copy(demo_images[1], folder / "nested" / "B.JPG")                      # any case
    Image.open(demo_images[2]).save(folder / "nested" / "deeper" / "c.png")
    (folder / "broken.jpg").write_text("not an image")
    (folder / "truncated.jpg").write_bytes(demo_images[3].read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image file name: ignored")

    def caption_run(expect_ran=True):
        run = run_luigi("CaptionImages", "--images", str(folder), workdir=workdir)
        assert run.returncode == 0, run.output
        assert ("ran successfully" in run.output) == expect_ran, run.output
        out = max(workdir.glob("folders/[!.]*"), key=lambda d: d.stat().st_mtime)
        return run.output, out, json.loads((out / "report.json").read_text())

    output, out, report = caption_run()
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [line["path"] for line in lines] == ["a.jpg", "nested/B.JPG", "nested/deeper/c.png"]
    assert all(line["caption"] and line["score"] <= 0 for line in lines)
    assert sorted(p["path"] for p in report["skipped"]) == ["broken.jpg", "truncated.jpg"]
    assert all(p["reason"] for p in report["skipped"]) and report["extracted"] == 3   # c.png and the broken two
    assert (out / "captions.csv").read_text().splitlines()[0] == "path,caption,score"
    last = output.strip().splitlines()[-1]
    assert last.startswith("captioner: results: ") and f"folder captions {out / 'captions.jsonl'}" in last
    assert "images/s" in output and "ETA" in output                                 # progress
    key = json.loads((out / "listing.json").read_text())["a.jpg"][2]
    assert key == ws.file_sha256(folder / "a.jpg")                                  # the content key
    maps = shards.read_attention(out / "attention.h5", contents.key_as_int64(key))
    assert maps["path"] == str(folder / "a.jpg")

    caption_run(expect_ran=False)                                                   # nothing changed

    shutil.copy(demo_images[4], folder / "nested" / "d.jpg")
    shutil.copy(demo_images[5], folder / "e.jpeg")
    shutil.copy(demo_images[6], folder / "a.jpg")                                    # new content, same path
    _, out2, report = caption_run()
    assert out2 != out and report["previous_output"] == out.name
    assert report["extracted"] == 0 and report["decoded"] == 3 and report["reused_captions"] == 2   # train images
    lines = [json.loads(line) for line in (out2 / "captions.jsonl").read_text().splitlines()]
    assert [line["path"] for line in lines] == ["a.jpg", "e.jpeg", "nested/B.JPG", "nested/d.jpg",
                                                "nested/deeper/c.png"]


def test_plot_attention_and_caption_cli(evaluated, tmp_path):
    workdir, _ = evaluated
    captions_dir, = workdir.glob("captions/*")
    image_id = json.loads((captions_dir / "test.json").read_text())[0]["image_id"]
    out = tmp_path / "att.png"
    runner = CliRunner()
    result = runner.invoke(cli, ["plot-attention", str(captions_dir), "--image-id", str(image_id), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_real_picture(out)

    model_dir, = workdir.glob("models/[!.]*")
    images = sorted(workdir.glob("demo/*/test/*.jpg"))[:2]
    missing = str(tmp_path / "missing.jpg")
    result = runner.invoke(cli, ["caption", str(images[0]), missing, str(images[1]), "--model", str(model_dir), "--json",
                                 "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 1                                                  # one bad path
    listed = json.loads(result.stdout)
    assert [r["image"] for r in listed] == [str(images[0]), missing, str(images[1])]
    assert listed[0]["caption"] and listed[2]["caption"] and listed[1]["error"] == "file not found"
    assert (tmp_path / "c-1.png").exists() and (tmp_path / "c-3.png").exists()   # numbered by position
    assert listed[2]["plot"] == str(tmp_path / "c-3.png") and not (tmp_path / "c-2.png").exists()

    folder = tmp_path / "few"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "one.jpg").write_bytes(images[0].read_bytes())
    (folder / "two.JPEG").write_bytes(images[1].read_bytes())
    result = runner.invoke(cli, ["caption", str(folder), "--model", str(model_dir), "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [w["path"] for w in written] == ["sub/one.jpg", "two.JPEG"]                # a folder, recursively
    assert written[0]["caption"] == listed[0]["caption"] and written[0]["score"] == listed[0]["score"] <= 0

    result = runner.invoke(cli, ["caption", str(images[0]), "--model", str(model_dir.parent)])
    assert result.exit_code != 0 and "is a folder of models" in result.output     # not a traceback
    assert str(model_dir) in result.output and "Traceback" not in result.output


def test_caption_refuses_a_different_encoder(evaluated, tmp_path):
    workdir, _ = evaluated
    model_dir, = workdir.glob("models/[!.]*")
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    provenance = json.loads((copy / "features.json").read_text())
    provenance["encoder"].update(weights="file", sha256="0" * 64)
    provenance["encoder"].pop("seed")
    (copy / "features.json").write_text(json.dumps(provenance))
    image = next(workdir.glob("demo/*/test/*.jpg"))
    result = CliRunner().invoke(cli, ["caption", str(image), "--model", str(copy)])
    assert result.exit_code != 0 and "no such file was found" in result.output and "--weights" in result.output


def test_a_copied_workspace_works_where_the_original_is_gone(evaluated, tmp_path):
    """Artifacts refer to workspace files by workspace-relative paths: copy the workspace, hide the original,
    and captioning, evaluation, plots, `caption --model` and `verify` all work on the copy."""
    import shutil
    workdir, _ = evaluated
    moved = tmp_path / "elsewhere" / "work"
    shutil.copytree(workdir, moved, symlinks=True)
    hidden = workdir.with_name(workdir.name + "-hidden")
    workdir.rename(hidden)
    try:
        status = CliRunner().invoke(cli, ["status", "--check", "--workspace", str(moved)])   # records name the original
        assert status.exit_code == 0 and "MISSING NOW" not in status.output, status.output
        for stage in ("captions", "metrics"):                          # recomputed on the copy
            shutil.rmtree(moved / stage)
        run = run_luigi("EvaluateCaptions", "--split", "test", workdir=moved)
        assert run.returncode == 0, run.output
        assert "2 ran successfully" in run.output                    # GenerateCaptions, EvaluateCaptions only
        assert not list(moved.glob("features/*/shard-*.h5.*"))        # nothing re-extracted or half-written
        captions_dir, = moved.glob("captions/[!.]*")
        image_id = json.loads((captions_dir / "test.json").read_text())[0]["image_id"]
        runner = CliRunner()
        out = tmp_path / "att.png"
        result = runner.invoke(cli, ["plot-attention", str(captions_dir), "--image-id", str(image_id), "--out", str(out)])
        assert result.exit_code == 0, result.output
        model_dir, = moved.glob("models/[!.]*")
        image = next(moved.glob("demo/*/test/*.jpg"))
        result = runner.invoke(cli, ["caption", str(image), "--model", str(model_dir), "--json"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(cli, ["verify", str(moved)])
        assert result.exit_code == 0, result.output
        # nothing in the copy names the original workspace
        for path in moved.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".jsonl") and "runs" not in path.parts:
                assert str(workdir) not in path.read_text(), path
        with h5py.File(captions_dir / "test-attention.h5") as f:
            assert not any(p.startswith("/") for p in f["paths"].asstr()[:])
    finally:
        hidden.rename(workdir)


def test_caption_cli_decodes_as_generate_captions_and_writes_out_and_one_png_per_image(evaluated, tmp_path):
    """`captioner caption` uses the model's decoding (length penalty included): the same captions and scores as
    GenerateCaptions for the same images; --out and --plot never overwrite each other."""
    workdir, _ = evaluated
    model_dir, = workdir.glob("models/[!.]*")
    decoding = json.loads((model_dir / "config.json").read_text())["decoding"]
    config = json.loads((model_dir / "config.json").read_text())
    config["decoding"] = {**decoding, "length_penalty": 0.3}   # off the CLI's former fixed 1.0, as the demo's 0.5
    (model_dir / "config.json").write_text(json.dumps(config))
    try:
        captions_dir, = workdir.glob("captions/[!.]*")
        records = manifests.read_manifest(next(workdir.glob("annotations/*/test.jsonl")))
        images = [workdir / r["root"] / r["path"] for r in records]
        for chosen in (images[:1], images):
            out, plot = tmp_path / f"o{len(chosen)}.jsonl", tmp_path / f"p{len(chosen)}.png"
            result = CliRunner().invoke(cli, ["caption", *map(str, chosen), "--model", str(model_dir),
                                              "--out", str(out), "--plot", str(plot)])
            assert result.exit_code == 0, result.output
            written = [json.loads(line) for line in out.read_text().splitlines()]
            assert [w["path"] for w in written] == [str(p) for p in chosen]
            pngs = [plot] if len(chosen) == 1 else [plot.with_name(f"{plot.stem}-{k + 1}.png") for k in range(len(chosen))]
            for png in pngs:
                assert_real_picture(png)
        generated = subprocess_free_generate(workdir, model_dir)
        assert [(w["caption"], w["score"]) for w in written] == [generated[r["image_id"]] for r in records]
    finally:
        config["decoding"] = decoding
        (model_dir / "config.json").write_text(json.dumps(config))


def subprocess_free_generate(workdir, model_dir) -> dict:
    """{image_id: (caption, score)} of GenerateCaptions' library call over the test split's stored features, with
    the model's recorded decoding."""
    from pipeline import decode, inputs
    store, = [p for p in workdir.glob("features/[!.]*") if p.is_dir()]
    index = json.loads(max(store.glob("splits/*/test.json")).read_text())
    d = json.loads((model_dir / "config.json").read_text())["decoding"]
    results, *_ = decode.generate(model_dir, inputs.shard_rows(store, index), d["beam_size"], d["max_length"],
                                  d["length_penalty"], d["suppress_unk"])
    return {r["image_id"]: (r["caption"], r["score"]) for r in results}



def test_captions_cut_by_max_length_are_counted_in_a_warning(evaluated):
    """A [generation] max_length too short for the captions cuts them: the log says how many, and the fix."""
    from pipeline import decode, inputs
    workdir, _ = evaluated
    model_dir, = workdir.glob("models/[!.]*")
    store, = [p for p in workdir.glob("features/[!.]*") if p.is_dir()]
    rows = inputs.shard_rows(store, json.loads(max(store.glob("splits/*/test.json")).read_text()))
    with captioner_log() as lines:
        results, _, tokens, _ = decode.generate(model_dir, rows, beam_size=1, max_length=1)
    unfinished = sum(row[0] != 2 for row in tokens)   # <end> is token 2
    assert unfinished > 0
    warning, = [line for line in lines if "captions reached [generation] max_length = 1" in line]
    assert warning.startswith(f"{unfinished} of {len(results)} captions") and "need [generation] max_length = " in warning
