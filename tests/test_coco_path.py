"""The shipped COCO configuration end to end: configs/coco2017.cfg as a user copies it (only the data paths
changed, sizes shrunk by flags) on a tiny COCO-format dataset without digit labels, through TrainDecoder →
GenerateCaptions → EvaluateCaptions: the paper's decoder, the exponential schedule, select_by = cider, beam
search, metrics and report — and nothing about digits anywhere."""
import json
import shutil

from pipeline.digits.demo import write_demo_dataset
from tests.conftest import REPO, run_luigi

SHRUNK = ["--encoder-weights", "random:0", "--encoder-batch-size", "8", "--features-shard-size", "16",
          "--vocabulary-min-count", "1", "--decoder-feature-dim", "32", "--decoder-attention-dim", "32",
          "--decoder-embed-dim", "16", "--decoder-units", "32", "--training-epochs", "2",
          "--training-batch-size", "16", "--training-checkpoint-every", "4", "--training-val-batch-size", "32",
          "--evaluation-report-examples", "2"]


def coco_dataset(root):
    """A COCO 2017-style dataset (train2017/, val2017/, annotations/, a Karpathy split file) from demo scenes, with
    plain file names and no digit labels: captions are all it has, like COCO's."""
    write_demo_dataset(root / "scenes", 16, 4, 4, seed=21)
    split = {"dataset": "coco", "images": []}
    for folder, parts in (("train2017", ["train"]), ("val2017", ["val", "test"])):
        (root / folder).mkdir()
        merged = {"images": [], "annotations": []}
        for part in parts:
            coco = json.loads((root / "scenes" / f"captions_{part}.json").read_text())
            for image in coco["images"]:
                name = f"{image['id']:012d}.jpg"
                shutil.copy(root / "scenes" / part / image["file_name"], root / folder / name)
                merged["images"].append({"id": image["id"], "file_name": name, "width": image["width"],
                                         "height": image["height"]})
                split["images"].append({"cocoid": image["id"], "filepath": folder, "filename": name,
                                        "split": part, "sentences": []})
            merged["annotations"] += coco["annotations"]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps(merged))
    (root / "dataset_coco.json").write_text(json.dumps(split))
    shutil.rmtree(root / "scenes")


def test_the_shipped_coco_config_runs_end_to_end_without_digit_metrics(tmp_path):
    data = tmp_path / "coco"
    coco_dataset(data)
    config = (REPO / "configs" / "coco2017.cfg").read_text()
    config = config.replace("/data/coco/annotations", str(data / "annotations")).replace("/data/coco", str(data))
    config = config.replace("karpathy_split =\n", f"karpathy_split = {data / 'dataset_coco.json'}\n")
    cfg = tmp_path / "mine.cfg"
    cfg.write_text(config)
    workdir = tmp_path / "work"

    run = run_luigi("EvaluateCaptions", "--split", "test", *SHRUNK, config=cfg, workdir=workdir, timeout=900)
    assert run.returncode == 0, run.output[-3000:]
    model, = workdir.glob("models/[!.]*")
    settings = json.loads((model / "config.json").read_text())
    assert (settings["lr_schedule"], settings["select_by"], settings["positions"], settings["location"]) == \
        ("exponential", "cider", False, 0)                                     # the paper's decoder, COCO's run
    assert settings["decoding"]["beam_size"] == 3 and settings["attention_keys"] == "features"
    history = json.loads((model / "history.json").read_text())
    assert len(history) == 2 and all("val_CIDEr" in h and "val_digits_exact" not in h for h in history)
    metrics_dir, = workdir.glob("metrics/[!.]*")
    metrics = json.loads((metrics_dir / "test.json").read_text())
    assert set(metrics["corpus"]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} and len(metrics["per_image"]) == 4
    # no digit metric anywhere (the captions name digits, the dataset declares none): metrics, report, log,
    # TensorBoard
    keys = lambda d: [k for k, v in d.items()] + [k for v in d.values() if isinstance(v, dict) for k in keys(v)]
    assert not [k for k in keys(metrics) + [k for e in metrics["per_image"] for k in e] if "digit" in k.lower()]
    report = (metrics_dir / "test-report.html").read_text().lower()
    log = run.output.lower()
    for label in ("digits exact", "digit count", "grounding", "digits and diversity", "digits named"):
        assert label not in report and label not in log, label
    for events in workdir.glob("checkpoints/*/tensorboard/*"):
        assert b"digits_exact" not in events.read_bytes()
