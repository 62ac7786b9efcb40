"""Luigi end to end on the tiny demo (configs/test.cfg): outputs, reruns, fingerprints, failures."""
import json
import os

import luigi
import luigi.cmdline_parser
import luigi.task_register
import pytest

from tests.conftest import run_luigi
from storage import manifests, workspace as ws


def stage_dirs(root, stage):
    return sorted(p.name for p in (root / stage).iterdir()) if (root / stage).exists() else []


def test_first_run_builds_everything_and_second_run_does_nothing(workdir):
    first = run_luigi("BuildVocabulary", workdir=workdir)
    assert first.returncode == 0, first.output
    assert "3 ran successfully" in first.output
    ann = workdir / "annotations" / stage_dirs(workdir, "annotations")[0]
    report = json.loads((ann / "report.json").read_text())
    assert report["splits"]["train"]["images"] == 24 and report["splits"]["val"]["images"] == 6
    assert sum(report["problem_counts"].values()) == 0
    train = manifests.read_manifest(ann / "train.jsonl")
    assert all(not os.path.isabs(r["root"]) for r in train)                # the demo lies in the workspace
    assert all(os.path.isfile(ws.resolve(r["root"], workdir) / r["path"]) for r in train)
    vocab = json.loads(next((workdir / "vocabulary").glob("*/vocab.json")).read_text())
    assert vocab["tokens"][:4] == ["<pad>", "<start>", "<end>", "<unk>"] and len(vocab["tokens"]) > 20
    provenance = json.loads(next((workdir / "vocabulary").glob("*/provenance.json")).read_text())
    assert provenance["upstream"] == {"annotations": ann.name}
    assert ws.leftover_temporaries(workdir) == []

    artifacts = lambda: {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if "runs" not in p.parts}
    before = artifacts()
    second = run_luigi("BuildVocabulary", workdir=workdir)
    assert second.returncode == 0, second.output
    assert "ran successfully" not in second.output and "1 complete ones were encountered" in second.output
    assert artifacts() == before                                   # only a new run record was written


def test_a_damaged_output_is_set_aside_and_recomputed(workdir):
    assert run_luigi("BuildVocabulary", workdir=workdir).returncode == 0
    vocab_dir = workdir / "vocabulary" / stage_dirs(workdir, "vocabulary")[0]
    good = (vocab_dir / "vocab.json").read_text()
    (vocab_dir / "vocab.json").write_text(good[:100])                       # e.g. a disk that lost its tail
    ann_dir = workdir / "annotations" / stage_dirs(workdir, "annotations")[0]
    (ann_dir / "val.jsonl").unlink()
    run = run_luigi("BuildVocabulary", workdir=workdir)
    assert run.returncode == 0, run.output
    assert "vocab.json is not valid JSON" in run.output and "val.jsonl is missing" in run.output
    assert (vocab_dir / "vocab.json").read_text() == good and (ann_dir / "val.jsonl").is_file()
    assert len(list((workdir / "vocabulary").glob(f".broken-{vocab_dir.name}-*"))) == 1   # kept for inspection


def fingerprints(*argv):
    """Fingerprint of every stage for the test config plus command-line overrides, computed in-process."""
    import tasks
    luigi.task_register.Register.clear_instance_cache()
    with luigi.cmdline_parser.CmdlineParser.global_instance(["BuildVocabulary", *argv]):
        return {t.stage: t.fingerprint()
                for t in (tasks.demo.MakeDemoDataset(), tasks.ExtractAnnotations(), tasks.BuildVocabulary())}


def test_fingerprints_change_exactly_downstream_of_a_changed_setting():
    base = fingerprints()
    assert base == fingerprints()
    vocab = fingerprints("--vocabulary-min-count", "3")
    assert vocab["demo"] == base["demo"] and vocab["annotations"] == base["annotations"]
    assert vocab["vocabulary"] != base["vocabulary"]
    demo = fingerprints("--demo-seed", "8")
    assert all(demo[s] != base[s] for s in base)
    # fractions are unused when a split file decides (the demo ships one): nothing changes
    assert fingerprints("--dataset-val-fraction", "0.3") == base


def test_self_critical_keys_count_only_when_self_critical_epochs_run():
    def stage_fingerprints(*argv):
        import tasks
        luigi.task_register.Register.clear_instance_cache()
        with luigi.cmdline_parser.CmdlineParser.global_instance(["TrainDecoder", *argv]):
            return tasks.demo.PretrainDigitsEncoder().fingerprint(), tasks.TrainDecoder().fingerprint()
    encoder, decoder = stage_fingerprints()
    assert stage_fingerprints("--pretrain-scene-train-from", "mixed5")[0] != encoder
    assert stage_fingerprints("--training-scst-reward", "digits")[1] == decoder
    scst = stage_fingerprints("--training-scst-epochs", "1")[1]
    assert scst != decoder and stage_fingerprints("--training-scst-epochs", "1", "--training-scst-reward",
                                                  "digits")[1] not in (decoder, scst)


def test_the_evaluations_identity_holds_what_java_resolves_to_and_the_reports_examples():
    """Metrics made without Java (auto, before Java was installed) are not taken for ones made with it."""
    from pipeline.evaluate import java_available

    def settings(*argv):
        import tasks
        luigi.task_register.Register.clear_instance_cache()
        with luigi.cmdline_parser.CmdlineParser.global_instance(["EvaluateCaptions", "--split", "test", *argv]):
            return tasks.EvaluateCaptions(split="test").settings()
    auto = settings("--evaluation-java", "auto")
    assert auto["java"] == ("yes" if java_available() else "no")
    assert settings("--evaluation-java", auto["java"]) == auto
    assert settings("--evaluation-java", "no" if auto["java"] == "yes" else "yes") != auto
    assert settings("--evaluation-report-examples", "3") != auto


def write_coco_dataset(tmp_path, captions):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(1, 11):
        (images / f"{i:012d}.jpg").write_bytes(b"x")
    coco = tmp_path / "captions_train2017.json"
    coco.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(1, 12)],
                                "annotations": captions}))
    cfg = tmp_path / "coco.cfg"
    cfg.write_text(f"[core]\nlocal_scheduler = true\n[dataset]\nsource = coco\nannotations = {coco}\nimages = {images}\n"
                   "val_fraction = 0.2\ntest_fraction = 0.2\nseed = 0\n[vocabulary]\nmin_count = 1\n")
    return coco, cfg


def test_coco_source_reports_problems_and_follows_file_content(tmp_path, workdir):
    captions = [{"id": k, "image_id": 1 + k % 11, "caption": f"A photo of thing {k % 3}."} for k in range(33)]
    captions.append({"id": 99, "image_id": 77, "caption": "unknown image"})
    coco, cfg = write_coco_dataset(tmp_path, captions)
    run = run_luigi("BuildVocabulary", config=cfg, workdir=workdir)
    assert run.returncode == 0, run.output
    report = json.loads(next(workdir.glob("annotations/*/report.json")).read_text())
    assert report["problem_counts"]["missing_image_file"] == 1           # image 11 has no file
    assert report["problem_counts"]["caption_for_unknown_image"] == 1
    assert "caption_for_unknown_image" in run.output                     # and the log says so
    assert sum(s["images"] for s in report["splits"].values()) == 10

    # the annotation file grows: annotations and vocabulary are recomputed
    captions.append({"id": 100, "image_id": 1, "caption": "A brand new word."})
    coco.write_text(json.dumps({**json.loads(coco.read_text()), "annotations": captions}))
    rerun = run_luigi("BuildVocabulary", config=cfg, workdir=workdir)
    assert rerun.returncode == 0, rerun.output
    assert len(stage_dirs(workdir, "annotations")) == 2 and len(stage_dirs(workdir, "vocabulary")) == 2


def test_a_grown_annotation_file_moves_no_image_between_splits(tmp_path, workdir):
    captions = [{"id": k, "image_id": 1 + k % 10, "caption": f"A photo of thing {k}."} for k in range(30)]
    coco, cfg = write_coco_dataset(tmp_path, captions)
    assert run_luigi("ExtractAnnotations", config=cfg, workdir=workdir).returncode == 0
    first = workdir / "annotations" / stage_dirs(workdir, "annotations")[0]
    assert json.loads((first / "report.json").read_text())["split_changes"] == {"previous": None}
    before = manifests.read_split_assignment(first)
    # the nightly file gained 30 images (ids 101–130), with val and test fractions of 0.2 each
    data = json.loads(coco.read_text())
    for i in range(101, 131):
        (tmp_path / "images" / f"{i:012d}.jpg").write_bytes(b"x")
        data["images"].append({"id": i, "file_name": f"{i:012d}.jpg"})
        data["annotations"].append({"id": 1000 + i, "image_id": i, "caption": "A new photo."})
    coco.write_text(json.dumps(data))
    run = run_luigi("ExtractAnnotations", config=cfg, workdir=workdir)
    assert run.returncode == 0, run.output
    (second,) = [workdir / "annotations" / d for d in stage_dirs(workdir, "annotations") if d != first.name]
    after = manifests.read_split_assignment(second)
    assert {i: after[i] for i in before} == before and len(after) == len(before) + 30
    assert {"val", "test"} <= set(after.values())                      # the fractions really split
    changes = json.loads((second / "report.json").read_text())["split_changes"]
    assert changes == {"previous": first.name, "compared_images": len(before), "moved": 0, "examples": []}


def test_malformed_annotation_file_fails_with_its_name_last(tmp_path, workdir):
    coco, cfg = write_coco_dataset(tmp_path, [])
    coco.write_text('{"images": [], "annotations": "none"}')
    run = run_luigi("BuildVocabulary", config=cfg, workdir=workdir)
    assert run.returncode != 0
    last = run.output.strip().splitlines()[-1]
    assert str(coco) in last and "annotations: expected a list" in last
    assert stage_dirs(workdir, "annotations") == [] and ws.leftover_temporaries(workdir) == []


@pytest.mark.parametrize("flag, value, needle", [
    ("--vocabulary-min-count", "0", "[vocabulary] min_count = 0 must be at least 1"),
    ("--vocabulary-max-length", "ten", "[vocabulary] max_length: not a valid int"),
    ("--demo-train-images", "-5", "[demo] train_images = -5 must be at least 1"),
    ("--dataset-test-fraction", "1.5", "[dataset] test_fraction = 1.5 must be in [0, 1)"),
])
def test_bad_setting_exits_nonzero_naming_section_and_key(workdir, flag, value, needle):
    run = run_luigi("BuildVocabulary", flag, value, workdir=workdir)
    assert run.returncode != 0
    last = run.output.strip().splitlines()[-1]
    assert needle in last and "Fix:" in last and "test.cfg" in last
