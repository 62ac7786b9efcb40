"""Training: the input pipeline, kill-and-resume, a two-device strategy."""
import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import checkpoints, inputs
from storage import shards
from tests.conftest import REPO, TEST_CONFIG, run_luigi


def make_store(tmp_path):
    """3 shards of 4-position, 8-channel features; 11 images with 1 to 5 captions each."""
    store = tmp_path / "store"
    image_ids = list(range(100, 111))
    index = {"images": {}}
    for k, ids in enumerate([image_ids[:4], image_ids[4:9], image_ids[9:]]):
        with shards.ShardWriter(store / f"shard-t-train-{k:05d}.h5", 4, 8, {}) as w:
            w.append([str(i) for i in ids], ids, [f"{i}.jpg" for i in ids],
                     np.stack([np.full((4, 8), i, np.float16) for i in ids]))
        for row, i in enumerate(ids):
            index["images"][str(i)] = [f"shard-t-train-{k:05d}", row]
    captions = {i: [np.arange(1, 2 + (i + j) % 6, dtype=np.int32) + 10 * j for j in range(1 + i % 5)]
                for i in image_ids}
    return store, index, captions


def epoch_pairs(store, index, captions, epoch, batch_size=7, block_rows=3):
    by_shard = inputs.shard_rows(store, index)
    out, widths_ok = [], True
    for ids, feats, caps in inputs.pairs_dataset(by_shard, captions, batch_size, seed=1, epoch=epoch,
                                                    shuffle_buffer=5, block_rows=block_rows, positions=4, channels=8):
        ids, feats, caps = ids.numpy(), feats.numpy(), caps.numpy()
        assert (feats[:, 0, 0] == ids).all()                                  # features belong to the id
        lengths = (caps != 0).sum(1)
        widths_ok &= caps.shape[1] == lengths.max()                            # padded to the batch's longest
        out += [(int(i), tuple(c[:n])) for i, c, n in zip(ids, caps, lengths)]
    return out, widths_ok


def test_every_pair_exactly_once_per_epoch_deterministic_per_epoch(tmp_path):
    store, index, captions = make_store(tmp_path)
    expected = collections.Counter((i, tuple(c)) for i, caps in captions.items() for c in caps)
    first, widths_ok = epoch_pairs(store, index, captions, epoch=0)
    assert collections.Counter(first) == expected and widths_ok
    assert epoch_pairs(store, index, captions, epoch=0)[0] == first          # a resumed epoch sees the same order
    second, _ = epoch_pairs(store, index, captions, epoch=1)
    assert collections.Counter(second) == expected and second != first      # reshuffled across epochs


def test_grouped_batches_hold_whole_images_and_every_pair_once(tmp_path):
    store, index, captions = make_store(tmp_path)
    by_shard = inputs.shard_rows(store, index)
    seen = []
    for ids, feats, caps in inputs.pairs_dataset(by_shard, captions, 3, seed=1, epoch=0, shuffle_buffer=4,
                                                 block_rows=3, positions=4, channels=8, group=True):
        ids, feats, caps = ids.numpy(), feats.numpy(), caps.numpy()
        assert len(ids) <= 3 and len(set(ids.tolist())) == len(ids)             # whole, distinct images
        assert (feats[:, 0, 0] == ids).all()
        assert caps.shape[1] == max(len(captions[i]) for i in ids)              # padded to the most captions
        for i, group in zip(ids, caps):
            real = [tuple(c[c != 0]) for c in group if c.any()]
            assert len(real) == len(captions[i])                                  # all of the image's captions
            seen += [(int(i), c) for c in real]
    assert collections.Counter(seen) == collections.Counter((i, tuple(c)) for i, caps in captions.items()
                                                            for c in caps)


def test_length_buckets_pad_less_and_keep_every_pair_once(tmp_path):
    store, index, captions = make_store(tmp_path)
    by_shard = inputs.shard_rows(store, index)
    expected = collections.Counter((i, tuple(c)) for i, caps in captions.items() for c in caps)
    for width in (0, 2):
        seen, batches = [], 0
        for ids, feats, caps in inputs.pairs_dataset(by_shard, captions, 4, seed=1, epoch=0, shuffle_buffer=5,
                                                     block_rows=3, positions=4, channels=8, bucket_width=width):
            ids, caps = ids.numpy(), caps.numpy()
            lengths = (caps != 0).sum(1)
            if width:   # every caption of a batch in one band of `width` tokens
                assert len(set((lengths // width).tolist())) == 1
            seen += [(int(i), tuple(c[:n])) for i, c, n in zip(ids, caps, lengths)]
            batches += 1
        assert collections.Counter(seen) == expected
        assert batches == inputs.batches_per_epoch(by_shard, captions, 4, width)   # what the schedule counts on


def test_feature_statistics_match_numpy(tmp_path):
    store, index, captions = make_store(tmp_path)
    mean, std = inputs.feature_statistics(inputs.shard_rows(store, index), block_rows=3)
    values = np.array([float(i) for i in index["images"]])                 # every feature of image i equals i
    np.testing.assert_allclose(mean, np.full(8, values.mean()), rtol=1e-6)
    np.testing.assert_allclose(std, np.full(8, values.std()), rtol=1e-5)


def test_blocks_are_contiguous_and_bounded():
    rows = [(0, 10), (1, 11), (2, 12), (5, 13), (9, 14), (10, 15)]
    assert inputs.blocks(rows, 4) == [(0, 3, rows[:3]), (5, 6, rows[3:4]), (9, 11, rows[4:])]


def checkpoint_steps(workdir):
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in workdir.glob("checkpoints/*/ckpt-*.index"))


def test_killed_training_resumes_from_its_checkpoint(extracted):
    workdir = extracted
    args = ["--training-epochs", "3", "--training-checkpoint-every", "3", "--training-select-by", "digits_exact"]
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(TEST_CONFIG), CAPTIONER_WORKDIR=str(workdir))
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "luigi"), "--module", "tasks",
                             "TrainDecoder", "--no-lock", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in checkpoint_steps(workdir) if s > 8]:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)                      # in epoch 2, after a mid-epoch checkpoint
    proc.wait()
    killed_at = checkpoint_steps(workdir)
    assert killed_at and max(killed_at) < 24
    assert not [p for p in workdir.glob("models/*") if not p.name.startswith(".tmp-")]   # no complete-looking model
    rerun = run_luigi("TrainDecoder", *args, workdir=workdir)
    assert rerun.returncode == 0, rerun.output
    assert "resuming from checkpoint" in rerun.output
    steps_per_epoch = 8                                       # 120 pairs / batch 16
    assert max(checkpoint_steps(workdir)) == 3 * steps_per_epoch
    history = json.loads(next(workdir.glob("models/*/history.json")).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]         # no epoch lost or repeated
    # the epochs kept as best, across the resume: each better than every earlier one by (digits exact, CIDEr-D)
    keys = [(h["val_digits_exact"], h["val_CIDEr"]) for h in history]
    assert [h["best"] for h in history] == [all(k > earlier for earlier in keys[:i]) for i, k in enumerate(keys)]
    model_dir, = workdir.glob("models/[!.]*")
    assert not list(workdir.glob("models/.tmp-*"))           # the killed run's temporary was cleaned up
    for name in ("decoder.weights.h5", "decoder.json", "vocab.json", "config.json", "features.json", "curves.png",
                 "provenance.json"):
        assert (model_dir / name).is_file(), name


def test_a_run_killed_in_its_self_critical_epochs_resumes_there(extracted):
    workdir = extracted
    args = ["--training-epochs", "1", "--training-scst-epochs", "2", "--training-scst-batch-size", "2",
            "--training-checkpoint-every", "2"]
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(TEST_CONFIG), CAPTIONER_WORKDIR=str(workdir))
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "luigi"), "--module", "tasks",
                             "TrainDecoder", "--no-lock", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    xent_steps = 8                                            # 120 pairs / batch 16; then 12 steps per scst epoch
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in checkpoint_steps(workdir) if s > xent_steps]:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)                      # inside the self-critical epochs
    proc.wait()
    assert xent_steps < max(checkpoint_steps(workdir)) < xent_steps + 24
    rerun = run_luigi("TrainDecoder", *args, workdir=workdir)
    assert rerun.returncode == 0, rerun.output
    assert "resuming from checkpoint" in rerun.output
    assert "epoch 1/1, step" not in rerun.output              # the cross-entropy epoch is not trained again
    assert max(checkpoint_steps(workdir)) == xent_steps + 24
    history = json.loads(next(workdir.glob("models/*/history.json")).read_text())
    assert [(h["epoch"], h["phase"]) for h in history] == [(1, "xent"), (2, "scst"), (3, "scst")]


def test_training_under_a_two_device_strategy(extracted):
    """Two replicas train the model one device trains: each global batch split in two, the loss normalised by
    the global batch's tokens, so the epoch's losses agree to float rounding (no dropout, the same data order)."""
    workdir = extracted
    histories = {}
    for strategy, devices, scst in (("mirrored", "2", "1"), ("default", "1", "0")):   # one device: the xent epoch
        run = run_luigi("TrainDecoder", "--training-strategy", strategy, "--training-cpu-devices", devices,
                        "--training-epochs", "1", "--training-scst-epochs", scst, "--decoder-dropout", "0",
                        workdir=workdir)
        assert run.returncode == 0, run.output
        if strategy == "mirrored":
            assert "MirroredStrategy over 2 replica(s)" in run.output
        models = [d for d in workdir.glob("models/[!.]*")
                  if json.loads((d / "config.json").read_text())["strategy"] == strategy]
        histories[strategy] = json.loads((models[0] / "history.json").read_text())
    two, one = histories["mirrored"], histories["default"]
    assert [h["phase"] for h in two] == ["xent", "scst"]  # and a self-critical epoch on both replicas
    assert all(np.isfinite(h["loss"]) for h in two)
    for key in ("loss", "xent", "attention"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-3), key


def test_min_steps_raise_the_epochs_of_a_small_dataset(extracted):
    from pipeline.train import epochs_to_train, patience_for
    assert epochs_to_train({"epochs": 5, "min_steps": 1200}, steps_per_epoch=253) == 5   # the demo's own
    assert epochs_to_train({"epochs": 5, "min_steps": 1200}, steps_per_epoch=189) == 7
    assert epochs_to_train({"epochs": 5, "min_steps": 0}, steps_per_epoch=3) == 5
    # the patience scales with them: as many steps without a better epoch before stopping
    assert [patience_for({"epochs": 5, "patience": 3}, e) for e in (5, 7, 25)] == [3, 5, 15]
    workdir = extracted
    run = run_luigi("TrainDecoder", "--training-epochs", "1", "--training-min-steps", "17", workdir=workdir)
    assert run.returncode == 0, run.output
    assert "training 3 epochs instead of 1: [training] min_steps = 17 at 8 steps per epoch" in run.output
    # the step lines show the attention term's weight (configs/test.cfg's λ = 1), the epoch lines the epoch kept
    assert "(total 8/24), loss" in run.output and "+ 1 × attention" in run.output
    assert "epoch 1/3: loss" in run.output and "; the best epoch so far by val CIDEr-D" in run.output
    model_dir, = workdir.glob("models/[!.]*")
    assert [h["epoch"] for h in json.loads((model_dir / "history.json").read_text())] == [1, 2, 3]
    ran = json.loads((model_dir / "config.json").read_text())
    assert ran["epochs"] == 3 and ran["patience"] == 15    # what ran: configs/test.cfg's patience 5, times 3


def test_two_runs_never_train_the_same_model_at_once(tmp_path):
    from pipeline.errors import InputError
    import pytest
    with checkpoints.exclusive_lock(tmp_path / ".lock"):
        with pytest.raises(InputError, match="another process is training this model"):
            with checkpoints.exclusive_lock(tmp_path / ".lock"):
                pass
    with checkpoints.exclusive_lock(tmp_path / ".lock"):     # released after the first run
        pass


def test_an_empty_split_still_writes_a_valid_attention_file(tmp_path):
    shards.write_attention(tmp_path / "a.h5", [], [], np.zeros((0, 5), np.int32), np.zeros((0, 5, 64)), {})
    import h5py
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["attention"].shape == (0, 5, 64)


def test_reduced_precision_extraction_and_training(tmp_path):
    """[encoder] precision is part of the store's identity (its own store, recorded in every shard) and its
    features stay close to float32's; [training] precision trains to finite losses (float16 with loss scaling),
    each precision a model of its own over the same features."""
    workdir = tmp_path / "w"
    for training in ("mixed_bfloat16", "mixed_float16"):
        args = ["--encoder-precision", "bfloat16", "--training-precision", training, "--training-epochs", "1"]
        run = run_luigi("TrainDecoder", *args, workdir=workdir)
        assert run.returncode == 0, run.output
    store, = [p for p in (workdir / "features").iterdir() if p.is_dir()]
    assert {shards.read_attrs(p)["precision"] for p in shards.list_shards(store)} == {"bfloat16"}
    models = {json.loads((m / "config.json").read_text())["precision"]: m for m in workdir.glob("models/[!.]*")}
    assert set(models) == {"mixed_bfloat16", "mixed_float16"}
    for model in models.values():
        assert json.loads((model / "features.json").read_text())["encoder"]["precision"] == "bfloat16"
        history = json.loads((model / "history.json").read_text())
        assert history and all(np.isfinite(h["loss"]) for h in history)

    assert run_luigi("ExtractFeatures", "--split", "train", "--encoder-precision", "float32",
                     workdir=workdir).returncode == 0                                  # float32 too
    stores = [p for p in (workdir / "features").iterdir() if p.is_dir()]
    assert len(stores) == 2                                     # a store never mixes precisions
    (full,) = [p for p in stores if p != store]
    index = lambda s: json.loads(next(s.glob("splits/*/train.json")).read_text())
    reduced, exact = index(store), index(full)
    for image_id, (shard, row) in list(exact["images"].items())[:4]:
        a = shards.read_rows(full / f"{shard}.h5", row, row + 1).astype(np.float32).ravel()
        other_shard, other_row = reduced["images"][image_id]
        b = shards.read_rows(store / f"{other_shard}.h5", other_row, other_row + 1).astype(np.float32).ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
