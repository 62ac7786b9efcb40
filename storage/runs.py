"""Run records: `<workspace>/runs/<id>.json`, one per `luigi --module tasks ...` invocation.

While a run goes on, every process of it (the main one and forked workers) appends one JSON line per task
event to `runs/.<id>.events.jsonl`; at exit the main process collates them into `<id>.json` and deletes the
events file. A run killed before that (kill -9, timeout, a power cut) leaves only its events file: read_runs
shows it as "interrupted" once its process is gone, with what it had finished.

The id is `<local time %Y%m%dT%H%M%S>-<host>-<pid>`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from storage.workspace import host_name, in_workspace, process_alive, write_json

RANK = {"scheduled": 0, "complete": 1, "ran": 2, "failed": 3}   # the most informative outcome of a task wins


def new_run_id(pid: int | None = None) -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{host_name()}-{pid or os.getpid()}"


def events_path(root: str | os.PathLike, run_id: str) -> Path:
    return Path(root) / "runs" / f".{run_id}.events.jsonl"


def append_event(root: str | os.PathLike, run_id: str, event: dict) -> None:
    """Append one task event (one line; appends of one line are atomic enough across forked workers)."""
    path = events_path(root, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")


def collate(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """(tasks, counts) from an events file: one entry per task, the most informative outcome winning; tasks
    only ever "scheduled" become "not run here" (another worker ran them, a failed dependency blocked them, or
    the run was interrupted first)."""
    tasks = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:   # the last line of a run killed mid-write
            continue
        if event["task"] not in tasks or RANK[event["outcome"]] >= RANK[tasks[event["task"]]["outcome"]]:
            tasks[event["task"]] = event
    for event in tasks.values():
        if event["outcome"] == "scheduled":
            event["outcome"] = "not run here"
    outcomes = [t["outcome"] for t in tasks.values()]
    counts = {o: outcomes.count(o) for o in ("ran", "complete", "failed", "not run here")}
    return sorted(tasks.values(), key=lambda t: t["task"]), counts


def finish(root: str | os.PathLike, run: dict, failures: list[str], upstream=None) -> dict | None:
    """Collate this run's events into runs/<id>.json (run: id, pid, started, command, config; upstream(tasks):
    the stages above them it did not see, as task entries) and delete the events file; None when the run
    recorded nothing (e.g. it stopped on a bad setting before scheduling)."""
    path = events_path(root, run["id"])
    if not path.exists():
        return None
    tasks, counts = collate(path)
    record = {**run, "finished": time.time(), "seconds": round(time.time() - run["started"], 3),
              "result": "failed" if counts["failed"] else "incomplete" if counts["not run here"] else "ok",
              "counts": counts, "tasks": tasks, "upstream": upstream(tasks) if upstream else [],
              "failures": failures}
    write_json(path.with_name(f"{run['id']}.json"), record)
    path.unlink()
    return record


def read_runs(root: str | os.PathLike) -> list[dict]:
    """Every run record of the workspace, oldest first: finished ones, plus runs whose process is gone without
    a record ("interrupted") or that are still going ("running"; a run on another host whose process we cannot
    check shows as "running or interrupted")."""
    runs_dir = Path(root) / "runs"
    records = [json.loads(p.read_text(encoding="utf-8")) for p in runs_dir.glob("*.json")]
    for path in runs_dir.glob(".*.events.jsonl"):
        run_id = path.name[1:-len(".events.jsonl")]
        stamp, _, rest = run_id.partition("-")
        host, _, pid = rest.rpartition("-")
        if not pid.isdecimal():
            continue
        if host != host_name():
            state = "running or interrupted"
        else:
            state = "running" if process_alive(int(pid)) else "interrupted"
        try:
            started = time.mktime(time.strptime(stamp, "%Y%m%dT%H%M%S"))
        except ValueError:
            started = path.stat().st_ctime
        tasks, counts = collate(path)
        last_event = path.stat().st_mtime
        records.append({"id": run_id, "pid": int(pid), "started": started, "finished": None,
                        "seconds": round(last_event - started, 3), "result": state, "counts": counts,
                        "tasks": tasks, "failures": [], "config": "?", "command": None})
    return sorted(records, key=lambda r: r["started"])


def output_now(root: str | os.PathLike, recorded: str) -> Path:
    """Where an output a run record names is now: the recorded path, or, when the workspace has moved since (the
    path is gone), the same place under `root`."""
    path, inside = Path(recorded), in_workspace(recorded)
    return path if path.exists() or inside is None else Path(root).joinpath(*inside)
