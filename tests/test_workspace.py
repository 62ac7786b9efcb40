"""Fingerprints and atomic outputs (storage/workspace.py)."""
import os

import pytest

from storage import workspace as ws


def test_fingerprint_stable_and_sensitive():
    base = ws.fingerprint("vocabulary", {"min_count": 5, "max_length": 20}, ["abc"])
    assert base == ws.fingerprint("vocabulary", {"max_length": 20, "min_count": 5}, ["abc"])   # key order
    assert len(base) == ws.FINGERPRINT_LENGTH
    assert base != ws.fingerprint("vocabulary", {"min_count": 4, "max_length": 20}, ["abc"])
    assert base != ws.fingerprint("vocabulary", {"min_count": 5, "max_length": 20}, ["abd"])   # upstream
    assert base != ws.fingerprint("features", {"min_count": 5, "max_length": 20}, ["abc"])
    assert ws.fingerprint("s", {}, ["a", "b"]) == ws.fingerprint("s", {}, ["b", "a"])


def test_workspace_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CAPTIONER_WORKDIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert ws.workspace_root() == tmp_path / "work"
    monkeypatch.setenv("CAPTIONER_WORKDIR", str(tmp_path / "env"))
    assert ws.workspace_root() == tmp_path / "env"
    assert ws.workspace_root(str(tmp_path / "cfg")) == tmp_path / "cfg"


def test_atomic_file_and_dir_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with ws.atomic_file(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        with ws.atomic_dir(tmp_path / "stage" / "fp") as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("crash")
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "stage" / "fp").exists()
    assert ws.leftover_temporaries(tmp_path) == []


def test_atomic_success_renames_and_cleans(tmp_path):
    with ws.atomic_dir(tmp_path / "stage" / "fp") as tmp:
        ws.write_json(tmp / "r.json", {"a": 1})
        assert not (tmp_path / "stage" / "fp").exists()       # invisible until complete
    assert (tmp_path / "stage" / "fp" / "r.json").read_text().startswith("{")
    assert ws.leftover_temporaries(tmp_path) == []


def test_outputs_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(ws, "fsync_path", lambda path: synced.append(os.path.basename(os.fspath(path))))
    with ws.atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    assert synced[0].startswith(ws.TEMP_PREFIX) and synced[1] == tmp_path.name   # content, then the directory
    synced.clear()
    monkeypatch.setattr(ws, "fsync_path", lambda path: synced.append(os.path.relpath(path, tmp_path)))
    with ws.atomic_dir(tmp_path / "stage" / "fp") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("1")
        (tmp / "y").write_text("2")
    temp = os.path.relpath(tmp, tmp_path)
    assert {os.path.join(temp, "sub", "x"), os.path.join(temp, "y"), os.path.join(temp, "sub"), temp} <= set(synced)
    assert synced.index(temp) == len(synced) - 2 and synced[-1] == "stage"      # the tree, then its parent


def test_output_problem_finds_missing_files_and_bad_json(tmp_path):
    (tmp_path / "a.json").write_text('{"ok": 1}')
    (tmp_path / "b.h5").write_bytes(b"")
    assert ws.output_problem(tmp_path, ("a.json", "b.h5")) is None
    assert ws.output_problem(tmp_path, ("a.json", "c.json")) == "c.json is missing"
    (tmp_path / "a.json").write_text('{"ok": ')
    assert ws.output_problem(tmp_path, ("a.json",)) == "a.json is not valid JSON"


def test_outputs_set_aside_in_the_same_second_are_all_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(ws.time, "time", lambda: 1_800_000_000.5)   # every rename in one second
    asides = []
    for k in range(3):
        (tmp_path / "fp").mkdir()
        (tmp_path / "fp" / "part").write_text(str(k))
        asides.append(ws.set_aside(tmp_path / "fp"))
    assert [a.name for a in asides] == [".broken-fp-1800000000", ".broken-fp-1800000000-1", ".broken-fp-1800000000-2"]
    assert [(a / "part").read_text() for a in asides] == ["0", "1", "2"] and not (tmp_path / "fp").exists()


def test_file_sha256_follows_content(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"one")
    first = ws.file_sha256(p)
    p.write_bytes(b"two!")
    os.utime(p, ns=(1, 1))
    assert ws.file_sha256(p) != first


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    final = tmp_path / "shard.h5"
    stale = tmp_path / f"{ws.TEMP_PREFIX}shard.h5.{ws.host_name()}-{dead.pid}.abc"
    alive = tmp_path / f"{ws.TEMP_PREFIX}shard.h5.{ws.host_name()}-{os.getpid()}.def"
    other_host = tmp_path / f"{ws.TEMP_PREFIX}shard.h5.elsewhere-{dead.pid}.ghi"
    for p in (stale, alive, other_host):
        p.write_text("partial")
    with ws.atomic_file(final) as tmp:
        tmp.write_text("whole")
    assert final.read_text() == "whole"
    assert not stale.exists() and alive.exists() and other_host.exists()
