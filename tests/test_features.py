"""Feature extraction: encoder weights, shard schema, bad images, crash + rerun, incremental store, inspect/verify."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import luigi.cmdline_parser
import luigi.task_register
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import encoder as encoder_lib, features
from cli import main as cli
from pipeline.digits.demo import write_demo_dataset
from pipeline.errors import InputError
from pipeline.images import load_image
from storage import shards, workspace as ws
from tests.badimages import make_bad_images
from tests.conftest import REPO, TEST_CONFIG, run_luigi

RANDOM = encoder_lib.resolve_weights("random:0")


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, 6, 2, 2, seed=3)
    return sorted(str(p) for p in root.glob("*/*.jpg"))


def test_grid_size_matches_inception():
    assert encoder_lib.grid_size(299) == 8 and encoder_lib.grid_size(75) == 1
    assert encoder_lib.grid_size(299, "mixed7") == 17 and encoder_lib.grid_size(75, "mixed7") == 3
    assert encoder_lib.layer_of(encoder_lib.encoder_name("mixed7")) == "mixed7"
    assert encoder_lib.layer_of("keras.applications.InceptionV3(include_top=False)/mixed3") is None


def test_weights_file_gives_the_same_features_as_the_model_it_was_saved_from(tmp_path, demo_images):
    model = encoder_lib.build_inception(encoder_lib.resolve_weights("random:3"), 299)
    weights_file = tmp_path / "inception.weights.h5"
    model.save_weights(weights_file)
    identity = encoder_lib.resolve_weights(str(weights_file))
    assert identity["weights"] == "file" and identity["sha256"] == ws.file_sha256(weights_file)
    batch = np.stack([load_image(p, 299) for p in demo_images[:4]])
    from_file = encoder_lib.build_encoder(identity, 299)(batch, training=False).numpy()
    in_memory = encoder_lib.build_encoder(encoder_lib.resolve_weights("random:3"), 299)(batch, training=False).numpy()
    assert from_file.shape == (4, 64, 2048)
    np.testing.assert_array_equal(from_file, in_memory)
    other_seed = encoder_lib.build_encoder(encoder_lib.resolve_weights("random:4"), 299)(batch, training=False)
    assert not np.allclose(other_seed.numpy(), in_memory)


def test_missing_weights_name_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(InputError) as e:
        encoder_lib.resolve_weights("imagenet")
    expected = tmp_path / "keras" / "models" / encoder_lib.IMAGENET_FILE
    assert str(expected) in str(e.value) and "random:<seed>" in str(e.value)
    assert "could not be downloaded (" in str(e.value) and encoder_lib.IMAGENET_URL in str(e.value)   # and why
    assert "bcbd6486424b2319ff4ef7d526e38f63" in str(e.value) and "is for tests" in str(e.value)
    assert "(Exception)" not in str(e.value)
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(InputError, match="is not an HDF5 file"):
        encoder_lib.resolve_weights(str(tmp_path / "notes.txt"))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["layers/dense/vars/0"] = np.zeros((2, 2))
    with pytest.raises(InputError, match="holds 1 weight arrays, and InceptionV3 without its top has 376"):
        encoder_lib.resolve_weights(str(tmp_path / "other.h5"))
    with pytest.raises(InputError, match="no such file"):
        encoder_lib.resolve_weights(str(tmp_path / "nope.h5"))
    with pytest.raises(InputError, match="must be an integer"):
        encoder_lib.resolve_weights("random:x")


def test_shard_schema_attrs_and_bad_images_skipped_and_reported(tmp_path, demo_images):
    corpus = make_bad_images(tmp_path / "bad")
    items = [[f"key-{1000 + i}", 1000 + i, os.path.dirname(p), os.path.basename(p)] for i, p in enumerate(demo_images)]
    for i, (name, (path, should_load)) in enumerate(sorted(corpus.items())):
        items.append([f"key-{2000 + i}", 2000 + i, str(tmp_path / "bad"), os.path.relpath(path, tmp_path / "bad")])
    good = {i for _, i, _, _ in items if i < 2000} | {2000 + i for i, (_, (_, ok)) in enumerate(sorted(corpus.items())) if ok}
    out = tmp_path / "store" / "shard-x-train-00000.h5"
    summary = features.extract_shard(out, items, RANDOM, 299, batch_size=8,
                                     attrs={"fingerprint": "store", "split": "train"})
    assert summary["rows"] == len(good) and summary["skipped"] == len(items) - len(good)
    with h5py.File(out) as f:
        assert f["features"].dtype == np.float16 and f["features"].shape == (len(good), 64, 2048)
        assert f["features"].chunks == (1, 64, 2048) and f["features"].compression is None
        assert sorted(f["image_ids"][:].tolist()) == sorted(good)
        assert f["contents"].asstr()[:].tolist() == [f"key-{i}" for i in f["image_ids"][:]]   # each row's key
        assert f["paths"].asstr()[0] == os.path.basename(demo_images[0])
        for key in ("schema_version", "encoder", "weights", "seed", "image_size", "preprocess", "dtype",
                    "created_at", "software", "fingerprint", "features_sha256"):
            assert key in f.attrs, key
        assert f.attrs["weights"] == "random" and f.attrs["seed"] == 0
        rows = f["features"][:].astype(np.float32)
        assert np.isfinite(rows).all() and (np.abs(rows).reshape(len(good), -1).max(axis=1) > 0).all()   # no zero rows
    skipped = {i: reason for i, _, reason, _ in shards.read_skipped(out)}
    assert set(skipped) == {i for _, i, _, _ in items} - good and all(skipped.values())
    assert {c for *_, c in shards.read_skipped(out)} == {f"key-{i}" for i in skipped}
    assert shards.check_shard(out, deep=True) == []
    assert ws.leftover_temporaries(tmp_path / "store") == []
    # the rows are the encoder's output for exactly those images (same batch: oneDNN results depend on it)
    batch = np.stack([load_image(p, 299) for p in demo_images[:8]])
    np.testing.assert_array_equal(shards.read_rows(out, 0, 8), features.encoder_forward(RANDOM, 299)(batch).numpy())


def test_a_transient_read_error_fails_the_shard_and_a_rerun_extracts_the_image(tmp_path, demo_images, monkeypatch):
    """Permission denied (or EIO) is not a fact about the image: the shard fails, nothing is recorded as
    skipped, and once the file is readable again the same shard extracts it."""
    import builtins
    import errno
    from pipeline.images import TransientReadError
    items = [[str(i), 1000 + i, os.path.dirname(p), os.path.basename(p)] for i, p in enumerate(demo_images[:3])]
    locked = demo_images[1]
    real_open = builtins.open

    def deny(file, *args, **kwargs):   # root reads everything, so chmod 000 cannot make this case
        if os.fspath(file) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return real_open(file, *args, **kwargs)

    out = tmp_path / "store" / "shard-x-train-00000.h5"
    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(TransientReadError, match="permission denied") as e:
        features.extract_shard(out, items, RANDOM, 299, batch_size=2, attrs={"fingerprint": "s", "split": "train"})
    assert locked in str(e.value) and e.value.errno == errno.EACCES
    assert not out.exists() and ws.leftover_temporaries(tmp_path / "store") == []
    monkeypatch.setattr(builtins, "open", real_open)                       # readable again: the rerun
    summary = features.extract_shard(out, items, RANDOM, 299, batch_size=2, attrs={"fingerprint": "s", "split": "train"})
    assert summary == {**summary, "rows": 3, "skipped": 0}


def test_a_missing_file_is_a_fact_not_a_transient_error(tmp_path):
    from pipeline.images import ImageError
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "gone.jpg", 75)


def store_of(workdir):
    stores = [p for p in (workdir / "features").iterdir() if p.is_dir()]
    assert len(stores) == 1
    return stores[0]


def all_features(workdir) -> dict:
    out = {}
    for path in shards.list_shards(store_of(workdir)):
        with h5py.File(path) as f:
            out.update(zip(f["image_ids"][:].tolist(), f["features"][:]))
    return out


@pytest.fixture(scope="module")
def reference_features(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    assert run_luigi("ExtractFeatures", "--split", "train", workdir=workdir).returncode == 0
    return all_features(workdir)


@pytest.mark.parametrize("kill_when", ["inside the first shard", "after the first shard"])
def test_killed_extraction_reruns_to_identical_features(tmp_path, reference_features, kill_when):
    crashed = tmp_path / "crashed"
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(TEST_CONFIG), CAPTIONER_WORKDIR=str(crashed))
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "luigi"), "--module", "tasks",
                             "ExtractFeatures", "--split", "train", "--no-lock"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pattern = "features/*/.tmp-shard-*" if kill_when == "inside the first shard" else "features/*/shard-*.h5"
    deadline = time.time() + 300
    while time.time() < deadline and not list(crashed.glob(pattern)):
        time.sleep(0.02)
    time.sleep(0.5 if kill_when == "inside the first shard" else 0.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in crashed.glob("features/*/shard-*.h5")}
    assert len(finished) == (0 if kill_when == "inside the first shard" else 1)
    if kill_when == "inside the first shard":                   # killed while writing: its temporary is left
        assert list(crashed.glob("features/*/.tmp-shard-*"))
    rerun = run_luigi("ExtractFeatures", "--split", "train", workdir=crashed)
    assert rerun.returncode == 0, rerun.output
    assert ws.leftover_temporaries(crashed) == []      # the dead process's temporary was cleaned up
    for name, identity in finished.items():            # no shard written twice
        path = next(crashed.glob(f"features/*/{name}"))
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == identity
    got = all_features(crashed)
    assert sorted(got) == sorted(reference_features)
    for image_id, want in reference_features.items():
        np.testing.assert_array_equal(got[image_id], want)


def coco_config(tmp_path, demo_root, n_images, annotations_dir=None):
    """A COCO-source config over the first n demo train images (all in train), its caption file written in
    `annotations_dir` (default tmp_path)."""
    coco = json.loads((demo_root / "captions_train.json").read_text())
    keep = {img["id"] for img in coco["images"][:n_images]}
    coco["images"] = [img for img in coco["images"] if img["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    captions = (annotations_dir or tmp_path) / "captions.json"
    captions.write_text(json.dumps(coco))
    cfg = tmp_path / "coco.cfg"
    cfg.write_text(TEST_CONFIG.read_text().replace(
        "[dataset]\nsource = demo", f"[dataset]\nsource = coco\nannotations = {captions}\n"
        f"images = {demo_root / 'train'}\nval_fraction = 0\ntest_fraction = 0"))
    return cfg, sorted(keep)


def test_grown_annotations_extract_only_new_images_and_unchanged_rerun_extracts_nothing(tmp_path, workdir):
    demo_root = tmp_path / "demo"
    write_demo_dataset(demo_root, 14, 1, 1, seed=5)
    cfg, first_ids = coco_config(tmp_path, demo_root, 10)
    run = run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=workdir)
    assert run.returncode == 0, run.output
    before = {p.name: p.stat().st_mtime_ns for p in shards.list_shards(store_of(workdir))}
    assert sorted(all_features(workdir)) == first_ids

    unchanged = run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=workdir)
    assert unchanged.returncode == 0 and "ran successfully" not in unchanged.output

    cfg, grown_ids = coco_config(tmp_path, demo_root, 14)
    grown = run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=workdir)
    assert grown.returncode == 0, grown.output
    assert "4 images to extract" in grown.output
    after = shards.list_shards(store_of(workdir))
    assert {p.name: p.stat().st_mtime_ns for p in after if p.name in before} == before   # old shards untouched
    new = [p for p in after if p.name not in before]
    assert sorted(i for p in new for i in shards.read_ids(p)[0].tolist()) == sorted(set(grown_ids) - set(first_ids))
    index = json.loads(max(store_of(workdir).glob("splits/*/train.json"), key=os.path.getmtime).read_text())
    assert sorted(map(int, index["images"])) == grown_ids


def test_a_dataset_mounted_elsewhere_is_the_same_dataset(tmp_path, workdir):
    """Manifests refer to dataset images by (images:<k>, relative path), resolved through the current config:
    after the dataset and its caption file move (another host's mount point), nothing is recomputed, and new
    images are read from the new place."""
    demo_root = tmp_path / "mnt-a" / "demo"
    write_demo_dataset(demo_root, 14, 1, 1, seed=5)
    cfg, _ = coco_config(tmp_path, demo_root, 10, annotations_dir=demo_root)
    run = run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=workdir)
    assert run.returncode == 0, run.output
    manifest, = workdir.glob("annotations/[!.]*/train.jsonl")
    assert {json.loads(line)["root"] for line in manifest.read_text().splitlines()} == {"images:0"}

    moved = tmp_path / "mnt-b" / "demo"
    moved.parent.mkdir()
    demo_root.rename(moved)
    cfg, _ = coco_config(tmp_path, moved, 10, annotations_dir=moved)
    rerun = run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=workdir)
    assert rerun.returncode == 0 and "ran successfully" not in rerun.output, rerun.output

    cfg, grown_ids = coco_config(tmp_path, moved, 14, annotations_dir=moved)
    grown = run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=workdir)
    assert grown.returncode == 0, grown.output
    assert "4 images to extract" in grown.output
    assert sorted(all_features(workdir)) == grown_ids                    # the 4 new ones read at mnt-b


def store_for(*argv):
    import tasks
    luigi.task_register.Register.clear_instance_cache()
    with luigi.cmdline_parser.CmdlineParser.global_instance(["ExtractFeatures", *argv]):
        return tasks.store_dir().name


FULL_DISK_WRITER = """
import resource, sys
import numpy as np
from storage import shards
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))   # a 1 MB file-size limit: writes fail with EFBIG
for attempt in range(3):   # the process goes on after each failure, as a Luigi worker does after a failed task
    try:
        with shards.ShardWriter(sys.argv[1], positions=289, channels=64, attrs={}) as shard:
            for i in range(100):
                shard.append([str(i)], [i], [f"{i}.jpg"], np.ones((1, 289, 64), np.float16))
    except OSError as e:
        print("failed:", e.errno, flush=True)
print("done", flush=True)
"""


def test_a_shard_write_that_fails_raises_and_leaves_nothing(tmp_path):
    """A write that fails (a full disk) raises OSError, leaves no file, and the process goes on: with HDF5's
    chunk cache the failed close crashed it (SIGSEGV) when the shard's handles were freed."""
    run = subprocess.run([sys.executable, "-c", FULL_DISK_WRITER, str(tmp_path / "shard-x-train-00000.h5")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert run.stdout.split("\n")[:4] == [f"failed: {errno.EFBIG}"] * 3 + ["done"]
    assert list(tmp_path.iterdir()) == []


def test_encoder_settings_and_only_they_start_a_new_store():
    base = store_for()
    assert store_for("--encoder-image-size", "224") != base
    assert store_for("--encoder-weights", "random:1") != base
    assert store_for("--encoder-batch-size", "3") == base
    assert store_for("--features-compression", "gzip") == base
    assert store_for("--features-shard-size", "5") == base


def test_inspect_and_verify_catch_a_corrupted_shard(tmp_path):
    workdir = tmp_path / "w"
    assert run_luigi("ExtractFeatures", "--split", "train", workdir=workdir).returncode == 0
    runner = CliRunner()
    store = store_of(workdir)
    result = runner.invoke(cli, ["inspect", str(store), "--stats", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert sum(i["rows"] for i in info) == 24 and info[0]["dtype"] == "float16"
    assert info[0]["attrs"]["weights"] == "random" and info[0]["stats"]["nonfinite"] == 0
    assert 0 < info[0]["stats"]["zero_fraction"] < 1
    image_id = shards.read_ids(info[0]["path"])[0][2]
    found = runner.invoke(cli, ["inspect", str(store), "--image-id", str(image_id)])
    assert found.exit_code == 0 and "row 2" in found.output
    ok = runner.invoke(cli, ["verify", str(workdir)])
    assert ok.exit_code == 0 and "ok" in ok.output

    # overwrite bytes inside the features: the file still opens, only the checksum can tell
    path = info[0]["path"]
    with h5py.File(path) as f:
        offset = f["features"].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        fh.write(b"\x00\x7c" * 64)
    bad = runner.invoke(cli, ["verify", str(workdir)])
    assert bad.exit_code == 1 and "checksum" in bad.output and os.path.basename(path) in bad.output

    # truncation is caught by verify and by the next run, which re-extracts that shard
    shutil.copy(path, tmp_path / "keep.h5")
    os.truncate(path, os.path.getsize(path) // 2)
    assert "cannot read" in runner.invoke(cli, ["verify", str(workdir)]).output
    rerun = run_luigi("ExtractFeatures", "--split", "train", workdir=workdir)
    assert rerun.returncode == 0 and "2 ran successfully" in rerun.output and "ExtractShard(" in rerun.output
    assert shards.check_shard(path) == []


def split_features(workdir, split="train") -> dict:
    """{image_id: features} through the newest split index of the workspace's store (what training reads)."""
    index = json.loads(max(store_of(workdir).glob(f"splits/*/{split}.json"), key=os.path.getmtime).read_text())
    return {int(i): shards.read_rows(store_of(workdir) / f"{shard}.h5", row, row + 1)[0]
            for i, (shard, row) in index["images"].items()}


def renumbered(demo_root, ids):
    """demo_root's train caption file with its images renumbered to `ids` (another dataset's ids)."""
    coco = json.loads((demo_root / "captions_train.json").read_text())
    new = dict(zip([img["id"] for img in coco["images"]], ids))
    for img in coco["images"]:
        img["id"] = new[img["id"]]
    for ann in coco["annotations"]:
        ann["image_id"] = new[ann["image_id"]]
    (demo_root / "captions_train.json").write_text(json.dumps(coco))


def test_datasets_whose_ids_collide_never_share_features_and_a_shared_picture_is_extracted_once(tmp_path, workdir):
    """Features belong to image contents: a second dataset numbered like the first gets exactly the features it
    gets in a fresh workspace, and the first dataset's pictures under other ids are not extracted again."""
    first, second = tmp_path / "first", tmp_path / "second"
    write_demo_dataset(first, 6, 1, 1, seed=5)
    write_demo_dataset(second, 6, 1, 1, seed=6)
    for name in "abc":
        (tmp_path / name).mkdir()
    first_cfg, first_ids = coco_config(tmp_path / "a", first, 6)
    renumbered(second, first_ids)                                  # the same ids, other pictures
    second_cfg, second_ids = coco_config(tmp_path / "b", second, 6)
    assert second_ids == first_ids
    assert run_luigi("ExtractFeatures", "--split", "train", config=first_cfg, workdir=workdir).returncode == 0
    shared = run_luigi("ExtractFeatures", "--split", "train", config=second_cfg, workdir=workdir)
    assert shared.returncode == 0 and "6 images to extract" in shared.output, shared.output
    fresh = tmp_path / "fresh"
    assert run_luigi("ExtractFeatures", "--split", "train", config=second_cfg, workdir=fresh).returncode == 0
    got, want = split_features(workdir), split_features(fresh)
    assert sorted(got) == sorted(want) == second_ids
    for image_id in second_ids:
        np.testing.assert_array_equal(got[image_id], want[image_id])

    renumbered(first, [i + 10_000_000 for i in first_ids])         # the first pictures under new ids
    moved_cfg, _ = coco_config(tmp_path / "c", first, 6)
    again = run_luigi("ExtractFeatures", "--split", "train", config=moved_cfg, workdir=workdir)
    assert again.returncode == 0 and "0 images to extract" in again.output, again.output


def test_a_picture_in_two_splits_is_extracted_once_whichever_split_is_asked_for_first(tmp_path, workdir):
    """A test picture that is also a train picture is planned in a train shard; asking for the test split first
    extracts that shard too, instead of extracting the picture again for the test split."""
    demo_root = tmp_path / "demo"
    write_demo_dataset(demo_root, 5, 1, 1, seed=5)
    cfg, ids = coco_config(tmp_path, demo_root, 5)
    coco = json.loads((tmp_path / "captions.json").read_text())
    twin = dict(coco["images"][0], id=999, file_name="twin-" + coco["images"][0]["file_name"])
    shutil.copy(demo_root / "train" / coco["images"][0]["file_name"], demo_root / "train" / twin["file_name"])
    coco["images"].append(twin)
    coco["annotations"].append({"id": 999, "image_id": 999, "caption": "the same picture again"})
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "split.json").write_text(json.dumps({"images": [{"cocoid": i, "split": "train"} for i in ids]
                                                    + [{"cocoid": 999, "split": "test"}]}))
    cfg.write_text(cfg.read_text().replace("val_fraction = 0\ntest_fraction = 0",
                                           f"karpathy_split = {tmp_path / 'split.json'}"))
    run = run_luigi("ExtractFeatures", "--split", "test", "--features-shard-size", "2", config=cfg, workdir=workdir)
    assert run.returncode == 0, run.output
    store = store_of(workdir)
    test_index = json.loads(next(store.glob("splits/*/test.json")).read_text())
    assert list(test_index["images"]) == ["999"] and "-train-" in test_index["images"]["999"][0]
    assert not list(store.glob("plans/repair-*"))   # not extracted again for the test split
    assert [p.stem for p in shards.list_shards(store)] == [test_index["images"]["999"][0]]   # only the shard it needs
    train = run_luigi("ExtractFeatures", "--split", "train", "--features-shard-size", "2", config=cfg, workdir=workdir)
    assert train.returncode == 0, train.output
    assert sum(len(shards.read_ids(p)[0]) for p in shards.list_shards(store)) == len(ids)   # each picture once


def test_a_plan_written_again_never_reuses_a_shard_name_and_an_older_damaged_shard_is_still_repaired(tmp_path,
                                                                                                        workdir):
    """An image copied in after a first run recomputes the annotations under the same fingerprint, so the plan is
    written again under its name: its new shards get names no shard file has (the old files keep what they hold),
    and a damaged shard of the plan's earlier version, which no plan lists now, is set aside and its images found
    again before training."""
    demo_root = tmp_path / "demo"
    write_demo_dataset(demo_root, 10, 1, 1, seed=5)
    cfg, ids = coco_config(tmp_path, demo_root, 10)
    cfg.write_text(cfg.read_text().replace("val_fraction = 0\n", "val_fraction = 0.3\n"))
    late = demo_root / "train" / json.loads((tmp_path / "captions.json").read_text())["images"][-1]["file_name"]
    late.rename(tmp_path / "late.jpg")                                   # missing at first
    assert run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=workdir).returncode == 0
    store = store_of(workdir)
    first = {p.name: p.stat().st_mtime_ns for p in shards.list_shards(store)}
    before = split_features(workdir)
    (tmp_path / "late.jpg").rename(late)
    again = run_luigi("ExtractFeatures", "--split", "train", config=cfg, workdir=workdir)
    assert again.returncode == 0 and "is there now" in again.output, again.output
    plan, = [json.loads(p.read_text()) for p in store.glob("plans/*.json") if not p.name.startswith("repair-")]
    assert plan["shards"] and not {s["name"] for s in plan["shards"]} & set(first)
    assert {p.name: p.stat().st_mtime_ns for p in shards.list_shards(store) if p.name in first} == first
    assert not list(store.glob("plans/repair-*"))                       # the plan holds all that was lacking
    old, = [store / name for name in first if "-train-" in name]
    with h5py.File(old) as f:
        offset = f["features"].id.get_chunk_info(2).byte_offset
    with open(old, "r+b") as fh:                                       # flip bytes; the file still opens
        fh.seek(offset + 64)
        fh.write(b"\x5a" * 16)
    run = run_luigi("TrainDecoder", "--training-epochs", "1", config=cfg, workdir=workdir)
    assert run.returncode == 30 and f"shard {old.name} is damaged" in run.output, run.output
    assert f"damaged shards ['{old.stem}'] were set aside; no plan lists them now" in run.output
    rerun = run_luigi("TrainDecoder", "--training-epochs", "1", config=cfg, workdir=workdir)
    assert rerun.returncode == 0, rerun.output
    after = split_features(workdir)
    assert set(before) < set(after)
    for image_id in before:
        np.testing.assert_array_equal(after[image_id], before[image_id])


def test_an_image_replaced_under_its_name_is_extracted_again_and_the_model_retrained(extracted):
    """The nightly case: an image file is replaced in place. The rerun notices it (sizes and mtimes of the split's
    files), extracts that image only, keys it by its new content and trains the model again from scratch."""
    workdir = extracted
    from PIL import Image
    assert run_luigi("TrainDecoder", workdir=workdir).returncode == 0
    index_path = max(store_of(workdir).glob("splits/*/train.json"), key=os.path.getmtime)
    manifest, = workdir.glob("annotations/[!.]*/train.jsonl")
    record = json.loads(manifest.read_text().splitlines()[3])
    path = workdir / record["root"] / record["path"]
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=95)
    model, = workdir.glob("models/[!.]*")
    trained = (model / "decoder.weights.h5").stat().st_mtime_ns

    rerun = run_luigi("TrainDecoder", workdir=workdir)
    assert rerun.returncode == 0, rerun.output
    assert "1 images to extract" in rerun.output and "training starts afresh" in rerun.output
    assert "resuming from checkpoint" not in rerun.output
    index = json.loads(index_path.read_text())
    assert index["contents"][str(record["image_id"])] == ws.file_sha256(path)
    assert (model / "decoder.weights.h5").stat().st_mtime_ns != trained
    unchanged = run_luigi("TrainDecoder", workdir=workdir)
    assert unchanged.returncode == 0 and "ran successfully" not in unchanged.output
