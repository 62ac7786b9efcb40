"""Operations: run records and status, overlapping runs, a damaged shard before training, a full disk,
a central scheduler with two workers."""
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cli import main as cli
from storage import shards, workspace as ws
from tests.conftest import REPO, TEST_CONFIG, run_luigi
from tests.test_features import all_features, store_of

LUIGI = os.path.join(os.path.dirname(sys.executable), "luigi")


def test_run_records_and_status(workdir):
    assert run_luigi("ExtractFeatures", "--split", "val", workdir=workdir).returncode == 0
    assert run_luigi("ExtractFeatures", "--split", "val", workdir=workdir).returncode == 0
    records = sorted((json.loads(p.read_text()) for p in (workdir / "runs").glob("*.json")),
                     key=lambda r: r["started"])
    first, second = records
    ran = {t["family"]: t for t in first["tasks"] if t["outcome"] == "ran"}
    assert set(ran) == {"MakeDemoDataset", "ExtractAnnotations", "PlanShards", "ExtractShard", "ExtractFeatures"}
    assert ran["ExtractShard"]["counts"]["rows"] == 6 and ran["ExtractShard"]["seconds"] > 0
    assert first["result"] == "ok" and second["result"] == "ok"
    assert second["counts"] == {"ran": 0, "complete": 1, "failed": 0, "not run here": 0}   # nothing redone
    assert not list((workdir / "runs").glob(".*"))                                          # events collated

    runner = CliRunner(env={"CAPTIONER_WORKDIR": str(workdir)})
    result = runner.invoke(cli, ["status", "--check"])
    assert result.exit_code == 0 and "ExtractFeatures(split=val)" in result.output
    for index in workdir.glob("features/*/splits/*/val.json"):
        index.unlink()
    result = runner.invoke(cli, ["status", "--check"])
    assert result.exit_code == 1 and "MISSING NOW" in result.output


def test_prune_deletes_what_the_config_no_longer_uses_and_keeps_its_chain(extracted, monkeypatch, tmp_path):
    """`captioner prune`: another version's model and checkpoints, an old set-aside copy and an older plan's
    split indexes go; the config's own chain (its model with its checkpoints), the shards and plans, a model
    named by [generation] model, and a recent output of another config stay, however old the kept files are."""
    import tasks
    monkeypatch.setenv("CAPTIONER_WORKDIR", str(extracted))
    store = store_of(extracted)
    month_ago = time.time() - 30 * 86400
    model = Path(tasks.TrainDecoder().output().path)                      # the chain's, not trained here
    chain = [p for stage in ("annotations", "vocabulary") for p in extracted.glob(f"{stage}/*")]
    chain += list(store.glob("splits/*")) + list(store.glob("plans/*")) + shards.list_shards(store)
    chain += [model, extracted / "checkpoints" / model.name]
    stale = [extracted / "models" / "0123456789ab", extracted / "checkpoints" / "0123456789ab",
             extracted / "annotations" / ".broken-abc-1", store / "splits" / "feedfeedfeed"]
    named = extracted / "models" / "abcdefabcdef"                        # another config's [generation] model
    recent = extracted / "metrics" / "ba9876543210"
    for path in stale + [recent, named, model, extracted / "checkpoints" / model.name]:
        path.mkdir(parents=True)
        (path / "decoder.weights.h5").write_text("1")   # what a [generation] model must hold
    for path in [p for root in stale + chain + [named] for p in [root, *root.rglob("*")]]:
        os.utime(path, (month_ago, month_ago))
    config = tmp_path / "named.cfg"
    config.write_text(TEST_CONFIG.read_text().replace("[generation]\n", f"[generation]\nmodel = {named}\n"))
    prune = lambda *flags: subprocess.run([os.path.join(os.path.dirname(sys.executable), "captioner"), "prune",
                                           *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
                                          env=dict(os.environ, LUIGI_CONFIG_PATH=str(config)))
    dry = prune("--dry-run")   # that config's model is the named one: test.cfg's chain model is not its
    assert dry.returncode == 0, dry.stderr
    assert sorted(line.split()[2] for line in dry.stdout.splitlines() if line.startswith("would delete")) == \
        sorted(map(str, stale + chain[-2:])) and all(p.exists() for p in stale), dry.stdout
    real = CliRunner().invoke(cli, ["prune"])                             # configs/test.cfg: no [generation] model
    assert real.exit_code == 0 and "freed" in real.output, real.output
    assert not any(p.exists() for p in stale + [named]) and recent.exists() and all(p.exists() for p in chain)
    typo = tmp_path / "typo.cfg"
    typo.write_text(TEST_CONFIG.read_text().replace("[decoder]\n", "[decoder]\nunit = 64\n"))
    refused = subprocess.run([os.path.join(os.path.dirname(sys.executable), "captioner"), "prune"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, LUIGI_CONFIG_PATH=str(typo)))
    assert refused.returncode == 35 and "[decoder] unit: unknown key" in refused.stderr   # a run would refuse it


def test_settings_shows_each_value_with_its_source(monkeypatch):
    """`captioner settings`: a value from the config file, one from a flag, one from the environment, one
    default, each with where it came from."""
    monkeypatch.setenv("CAPTIONER_WORKDIR", "/srv/captioner-work")
    result = CliRunner().invoke(cli, ["settings", "--training-epochs", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["section"], r["key"]): r for r in json.loads(result.output)}
    assert rows[("training", "batch_size")]["value"] == "16"                    # configs/test.cfg
    assert rows[("training", "batch_size")]["source"] == f"file {TEST_CONFIG}"
    assert rows[("training", "epochs")]["value"] == "3" and rows[("training", "epochs")]["source"] == \
        "flag --training-epochs"
    assert rows[("workspace", "root")]["value"] == "/srv/captioner-work"
    assert rows[("workspace", "root")]["source"] == "environment $CAPTIONER_WORKDIR"
    assert rows[("training", "scst_samples")]["source"] == "default" and rows[("training", "scst_samples")]["help"]
    assert rows[("vocabulary", "min_count")]["source"] == f"file {REPO / 'configs' / 'demo.cfg'}"   # the demo's layer
    text = CliRunner().invoke(cli, ["settings", "--training-epochs=3"]).output
    assert re.search(r"epochs = 3 +# flag --training-epochs · default '20'", text)


def test_a_dataset_source_flag_decides_whether_the_demo_config_is_layered(tmp_path):
    """`--dataset-source coco` on the command line of a demo config drops configs/demo.cfg (its digits encoder
    and plug-in), and `--dataset-source=demo` on a COCO config adds it: the flag decides, as it does the value."""
    coco = tmp_path / "coco.cfg"
    coco.write_text("[dataset]\nsource = coco\n")
    captioner = os.path.join(os.path.dirname(sys.executable), "captioner")

    def layered(config, *flags, code=0):
        run = subprocess.run([captioner, "settings", *flags, "--json"], cwd=REPO, capture_output=True, text=True,
                             env=dict(os.environ, LUIGI_CONFIG_PATH=str(config)), timeout=120)
        assert run.returncode == code, run.stderr
        assert ("source = coco needs caption files" in run.stderr) == (code == 35)   # a run would stop: none given
        rows = {(r["section"], r["key"]): r for r in json.loads(run.stdout)}
        return rows[("dataset", "plugins")]["value"], rows[("encoder", "weights")]["value"]

    assert layered(TEST_CONFIG) == ("pipeline.digits", "random:0")   # configs/test.cfg: source = demo
    assert layered(TEST_CONFIG, "--dataset-source", "coco", code=35) == ("", "random:0")
    assert layered(coco, code=35) == ("", "imagenet")
    assert layered(coco, "--dataset-source=demo") == ("pipeline.digits", "digits")


def test_settings_stops_on_what_a_run_would_stop_on(tmp_path):
    """`captioner settings` shows the values, then every problem the run would stop on, with the run's exit code:
    a flag written in part, an unknown key, a line the config parser cannot read (which `luigi` itself reports
    only as a traceback)."""
    captioner = os.path.join(os.path.dirname(sys.executable), "captioner")
    typo, unreadable = tmp_path / "typo.cfg", tmp_path / "unreadable.cfg"
    typo.write_text("[training]\nepochz = 3\n")
    unreadable.write_text("[training]\nepochs 3\n")
    settings = lambda config, *flags: subprocess.run(
        [captioner, "settings", *flags], cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, LUIGI_CONFIG_PATH=str(config)))
    partial = settings(TEST_CONFIG, "--training-epoch", "3")
    assert partial.returncode == 35 and re.search(r"epochs = 2 +# file", partial.stdout)   # the flag unread
    assert "--training-epoch: not a full flag name (did you mean --training-epochs?)" in partial.stderr
    unknown = settings(typo)
    assert unknown.returncode == 35 and f"{typo}: [training] epochz: unknown key (did you mean epochs?)" in \
        unknown.stderr
    bad = settings(unreadable)
    assert bad.returncode == 35 and str(unreadable) in bad.stderr and "[line 2]: 'epochs 3" in bad.stderr
    assert "Traceback" not in bad.stderr and "Fix: every line of a config file is" in bad.stderr


def test_a_killed_run_shows_as_interrupted_with_what_it_finished(workdir):
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(TEST_CONFIG), CAPTIONER_WORKDIR=str(workdir))
    command = [LUIGI, "--module", "tasks", "ExtractFeatures", "--split", "train", "--features-shard-size", "3"]
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    shard_ran = lambda line: '"family": "ExtractShard"' in line and '"outcome": "ran"' in line
    while time.monotonic() < deadline and not any(   # kill -9 once the first shard is done
            shard_ran(line) for p in (workdir / "runs").glob(".*.events.jsonl") for line in p.read_text().splitlines()):
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not list((workdir / "runs").glob("*.json"))                   # it could not write its record
    result = CliRunner(env={"CAPTIONER_WORKDIR": str(workdir)}).invoke(cli, ["status", "--check"])
    assert result.exit_code == 1, result.output                          # the last run did not succeed
    line = next(line for line in result.output.splitlines() if f"-{run.pid}" in line)
    assert "interrupted" in line and re.search(r"[1-9]\d* ran", line)
    assert re.search(r"ExtractShard\(.*\)\s+ran", result.output)          # what it had finished


def test_a_failed_run_is_recorded_with_its_reason(workdir):
    run = run_luigi("ExtractFeatures", "--encoder-weights", "/nonexistent/w.h5", workdir=workdir)
    assert run.returncode != 0 and "/nonexistent/w.h5" in run.output.strip().splitlines()[-1]
    record = json.loads(next((workdir / "runs").glob("*.json")).read_text())
    assert record["result"] == "failed" and any("/nonexistent/w.h5" in f for f in record["failures"])


def test_an_identical_invocation_is_refused_on_the_same_workspace_and_config_only(workdir, tmp_path):
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(TEST_CONFIG), CAPTIONER_WORKDIR=str(workdir))
    command = [LUIGI, "--module", "tasks", "ExtractFeatures", "--split", "train", "--features-shard-size", "3"]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(100):                                          # until the first holds its lock
        if list((workdir / ".locks").glob("*/*.pid")):
            break
        time.sleep(0.1)
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    other_config = tmp_path / "other.cfg"                         # another dataset's config, the same command
    other_config.write_text(TEST_CONFIG.read_text().replace("seed = 7", "seed = 8"))
    beside = subprocess.Popen(command, cwd=REPO, env={**env, "LUIGI_CONFIG_PATH": str(other_config)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert first.poll() is None                                   # still running when the second was refused
    elsewhere = subprocess.run(command, cwd=REPO, env={**env, "CAPTIONER_WORKDIR": str(tmp_path / "other")},
                               capture_output=True, text=True, timeout=600)
    first_output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, first_output
    assert second.returncode == 10, second.stdout + second.stderr          # [retcode] already_running
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("captioner: ERROR: the same command is already running on workspace")
    assert f"pid {first.pid}" in error and str(workdir) in error
    assert elsewhere.returncode == 0, elsewhere.stdout + elsewhere.stderr   # another workspace runs freely
    beside_output, _ = beside.communicate(timeout=600)
    assert beside.returncode == 0, beside_output                            # so does another config
    assert ws.leftover_temporaries(workdir) == []
    assert all(not shards.check_shard(p, deep=True) for p in shards.list_shards(store_of(workdir)))


def test_a_damaged_shard_is_extracted_again_before_training(extracted):
    workdir = extracted
    before = all_features(workdir)
    path = sorted(p for p in shards.list_shards(store_of(workdir)) if "-train-" in p.name)[0]
    import h5py
    with h5py.File(path) as f:
        offset = f["features"].id.get_chunk_info(2).byte_offset
    with open(path, "r+b") as fh:                                          # flip bytes; the file still opens
        fh.seek(offset + 64)
        fh.write(b"\x5a" * 16)
    assert shards.check_shard(path) == [] and shards.check_shard(path, deep=True)
    run = run_luigi("TrainDecoder", "--training-epochs", "1", workdir=workdir)
    assert run.returncode == 0, run.output
    assert f"shard {path.name} is damaged" in run.output and "extracted again" in run.output
    assert f"- 1 ExtractShard(plan={path.stem.split('-')[1]}" in run.output     # through the scheduler
    assert shards.check_shard(path, deep=True) == []
    after = all_features(workdir)
    assert sorted(after) == sorted(before)
    for image_id in before:
        np.testing.assert_array_equal(after[image_id], before[image_id])
    assert list(store_of(workdir).glob(f".damaged-*-{path.name}"))          # kept aside for inspection


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                      # a write past the limit gets EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_fails_clearly_and_leaves_nothing_complete_looking(tmp_path):
    """The workspace on a 6 MB tmpfs when this machine allows mounts; otherwise the same failure simulated
    with a 3 MB file-size limit on the process (EFBIG instead of ENOSPC)."""
    workdir = tmp_path / "small"
    workdir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(workdir)],
                             capture_output=True).returncode == 0
    if not mounted:
        print("tmpfs mount not permitted here: simulating a full disk with RLIMIT_FSIZE")
    try:
        env = dict(os.environ, LUIGI_CONFIG_PATH=str(TEST_CONFIG), CAPTIONER_WORKDIR=str(workdir))
        run = subprocess.run([LUIGI, "--module", "tasks", "ExtractFeatures", "--split", "train", "--no-lock"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                             preexec_fn=None if mounted else _limit_file_size(3 * 2**20))
        output = run.stdout + run.stderr
        # the task fails (configs/test.cfg: task_failed = 30); -11 was HDF5 crashing as the failed shard was freed
        assert run.returncode == 30, (run.returncode, output[-3000:])
        last = output.strip().splitlines()[-1]
        assert "filesystem is full or the file size limit was hit" in last and "Fix:" in last
        assert ws.leftover_temporaries(workdir) == []
        for path in workdir.glob("features/*/shard-*.h5"):                 # what exists is complete
            assert shards.check_shard(path, deep=True) == []
        assert not list(workdir.glob("features/*/splits/*/train.json"))
    finally:
        if mounted:
            subprocess.run(["umount", str(workdir)], check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_central_scheduler_two_workers_extract_every_shard_once(tmp_path):
    port = free_port()
    scheduler_cfg = tmp_path / "luigid.cfg"
    scheduler_cfg.write_text(f"[scheduler]\nstate_path = {tmp_path / 'state.pickle'}\nrecord_task_history = false\n"
                             "[resources]\ngpu = 1\n")
    (tmp_path / "logs").mkdir()
    luigid = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "luigid"), "--address", "127.0.0.1",
                               "--port", str(port), "--logdir", str(tmp_path / "logs")],
                              env=dict(os.environ, LUIGI_CONFIG_PATH=str(scheduler_cfg)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        worker_cfg = tmp_path / "worker.cfg"
        worker_cfg.write_text(TEST_CONFIG.read_text() + f"\n[core]\nlocal_scheduler = false\n"
                              f"default_scheduler_host = 127.0.0.1\ndefault_scheduler_port = {port}\n")
        workdir, args = tmp_path / "shared", ["--features-shard-size", "4"]
        assert run_luigi("PlanShards", *args, config=worker_cfg, workdir=workdir).returncode == 0
        env = dict(os.environ, LUIGI_CONFIG_PATH=str(worker_cfg), CAPTIONER_WORKDIR=str(workdir))
        workers = [subprocess.Popen([LUIGI, "--module", "tasks", "ExtractFeatures", "--split", "train", "--no-lock",
                                     *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for _ in range(2)]
        outputs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        luigid.terminate()
        luigid.wait()
    # 0, or 10 / 25 (luigi's run_by_other_worker / not_run) for a worker whose tasks the other one ran
    assert all(w.returncode in (0, 10, 25) for w in workers), outputs
    extracted = [name for out in outputs for name in re.findall(r"\] (shard-\S+): \d+ rows", out)]
    plan = json.loads(next(workdir.glob("features/*/plans/*.json")).read_text())
    expected = [s["name"] for s in plan["shards"] if s["split"] == "train"]
    assert sorted(extracted) == sorted(expected)                       # every shard exactly once
    # [resources] gpu = 1 on luigid: two extractions never overlapped, across both workers
    intervals = sorted((t["finished"] - t["seconds"], t["finished"])
                       for p in (workdir / "runs").glob("*.json") for t in json.loads(p.read_text())["tasks"]
                       if t["family"] == "ExtractShard" and t["outcome"] == "ran")
    assert len(intervals) == len(expected)
    assert all(end <= next_start + 0.05 for (_, end), (next_start, _) in zip(intervals, intervals[1:]))
    # the same features as one local worker computes
    single = tmp_path / "single"
    assert run_luigi("ExtractFeatures", "--split", "train", *args, workdir=single).returncode == 0
    got, want = all_features(workdir), all_features(single)
    assert sorted(got) == sorted(want)
    for image_id in want:
        np.testing.assert_array_equal(got[image_id], want[image_id])
