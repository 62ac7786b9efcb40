"""Run records: every invocation leaves runs/<id>.json; failures are repeated last."""
from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path

import luigi

from pipeline.errors import InputError
from storage import runs
from tasks.config import config_files, workspace_root

log = logging.getLogger("captioner")


class _NoTracebackForInputErrors(logging.Filter):
    """A bad input (InputError: a message naming the file, the field and the fix) is said once, last, by
    _at_exit; the worker's "failed" line stays, without a traceback that would only repeat the message."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], InputError):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("luigi-interface").addFilter(_NoTracebackForInputErrors())


# --------------------------------------------------------------------------- run records, failures last

# Every invocation that schedules tasks leaves runs/<started>-<host>-<pid>.json (storage/runs.py): each task it
# saw, whether it ran (with seconds and counts), was already complete, failed (with why), or was left to another
# worker. Events may fire in forked worker processes (--workers N), so they are appended to an events file first
# and collated by the main process at exit.
_RUN = {"id": runs.new_run_id(), "pid": os.getpid(), "started": time.time()}
_failures: list[str] = []


def record(task, outcome: str, **fields) -> None:
    """Append one event about `task` to this invocation's run record."""
    try:
        outputs = [getattr(t, "path", str(t)) for t in luigi.task.flatten(task.output())]
    except Exception:   # the output of a task with a bad setting cannot be named
        outputs = []
    event = {"task": task.task_id, "family": task.task_family, "params": task.to_str_params(), "outcome": outcome,
             "outputs": outputs, **fields}
    try:
        runs.append_event(workspace_root(), _RUN["id"], event)
    except Exception as e:   # a record must never break the run it records
        log.warning("could not record %s for the run log: %s", task.task_id, e)


@luigi.Task.event_handler(luigi.Event.DEPENDENCY_DISCOVERED)
def _on_discovered(task, dependency):
    record(dependency, "scheduled")


@luigi.Task.event_handler(luigi.Event.DEPENDENCY_PRESENT)
def _on_present(task):
    record(task, "complete")


@luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
def _on_time(task, seconds):
    record(task, "ran", seconds=round(seconds, 3), finished=time.time(), counts=getattr(task, "counts", {}))


@luigi.Task.event_handler(luigi.Event.FAILURE)
@luigi.Task.event_handler(luigi.Event.BROKEN_TASK)
def remember_failure(task, exception):
    _failures.append(f"{task.task_family} failed: {exception}")
    record(task, "failed", error=f"{type(exception).__name__}: {exception}")


@atexit.register
def _at_exit():
    """Write the run record, then repeat why we failed after Luigi's summary, where a cron mail shows it."""
    if os.getpid() != _RUN["pid"]:   # a forked worker: the main process reports
        return
    failures, finished = list(_failures), None
    try:
        run = {**_RUN, "command": sys.argv, "config": config_files()}
        finished = runs.finish(workspace_root(), run, list(dict.fromkeys(_failures)), _chain)
        if finished:   # tasks that failed in forked workers (--workers N) are only known from their events
            failures += [f"{t['family']} failed: {t['error'].split(': ', 1)[-1]}" for t in finished["tasks"]
                         if t["outcome"] == "failed"]
    except Exception as e:
        print(f"captioner: could not write the run record: {e}", file=sys.stderr)
    for line in dict.fromkeys(failures):
        print(f"captioner: ERROR: {line}", file=sys.stderr)
    line = _results_line(finished["tasks"] + finished["upstream"]) if finished and not failures else ""
    if line:
        print(f"captioner: results: {line}", file=sys.stderr)


def upstream(roots: list) -> list:
    """Every task upstream of the luigi tasks `roots`, each once, as luigi would walk them (nothing runs; the
    warnings of the completeness checks some requires() make are silenced: nothing is recomputed here)."""
    seen, out, todo = {t.task_id for t in roots}, [], list(roots)
    logging.disable(logging.WARNING)
    try:
        while todo:
            for up in luigi.task.flatten(todo.pop().requires()):
                if up.task_id not in seen:
                    seen.add(up.task_id)
                    out.append(up)
                    todo.append(up)
    finally:
        logging.disable(logging.NOTSET)
    return out


def _chain(tasks: list[dict]) -> list[dict]:
    """The stages upstream of a run's tasks that it did not record (luigi looks no further upstream than a
    complete task, so an unchanged rerun records only the task it was asked for), as records: the run record
    keeps them, so `captioner prune` knows what the run uses, and the results line names the model and
    captions behind complete metrics."""
    try:
        found = upstream([luigi.task_register.Register.get_task_cls(t["family"]).from_str_params(t["params"])
                          for t in tasks])
    except Exception as e:   # a convenience: the record holds what the run saw
        return [{"task": "?", "family": "?", "params": {}, "outcome": "not found", "outputs": [], "error": str(e)}]
    return [{"task": t.task_id, "family": t.task_family, "params": t.to_str_params(), "outcome": "complete",
             "outputs": [o.path for o in luigi.task.flatten(t.output())]} for t in found]


def _results_line(tasks: list[dict]) -> str:
    """The main artifacts a run made or found complete, for its last line: the model directory, captions,
    metrics and report files (paths relative to the current directory when under it, and it is not /)."""
    here = Path.cwd()
    shown = lambda path: os.path.relpath(path) if here.parent != here and Path(path).resolve().is_relative_to(here) \
        else path
    parts = []
    for t in tasks:
        if t["outcome"] not in ("ran", "complete") or not t["outputs"]:
            continue
        out, split = t["outputs"][0], t["params"].get("split", "")
        if t["family"] == "TrainDecoder":
            parts.append(f"model {shown(out)}")
        elif t["family"] == "GenerateCaptions":
            parts.append(f"{split} captions {shown(out)}")
        elif t["family"] == "CaptionImages":
            parts.append(f"folder captions {shown(Path(out) / 'captions.jsonl')}")
        elif t["family"] == "EvaluateCaptions":
            parts += [f"{split} metrics {shown(out)}",
                      f"{split} report {shown(Path(out).with_name(f'{split}-report.html'))}"]
    return " · ".join(parts)
