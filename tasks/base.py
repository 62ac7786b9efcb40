"""The Luigi base classes of every stage: a fingerprinted output directory written atomically, progress
forwarded to Luigi, and the targets that check feature shards quickly."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import luigi

from storage import manifests, shards, workspace as ws
from tasks.config import check_every_section, workspace_root
from tasks.records import remember_failure

log = logging.getLogger("captioner")


class ReportsProgress:
    """Forwards pipeline.progress callbacks to Luigi's progress percentage and status message."""

    def report_progress(self, percent: int, message: str) -> None:
        self.set_progress_percentage(percent)
        self.set_status_message(message)


class Stage(ReportsProgress, luigi.Task):
    """A task whose output is the directory <workspace>/<stage>/<fingerprint>."""
    stage = ""
    version = 1   # bump when a stage's code changes what it writes
    expected_files: tuple = ()   # besides provenance.json; checked (and *.json parsed) by complete()

    # Keys added after outputs were written, left out of the settings at these values: those outputs stay found.
    added_later: dict = {}

    def settings(self) -> dict:
        """The significant settings of this stage (upstream ones enter through upstream fingerprints)."""
        raise NotImplementedError

    def without_added_later(self, values: dict) -> dict:
        return {k: v for k, v in values.items() if k not in self.added_later or self.added_later[k] != v}

    def upstream_stages(self) -> list["Stage"]:
        return [t for t in luigi.task.flatten(self.requires()) if isinstance(t, Stage)]

    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            upstream = [t.fingerprint() for t in self.upstream_stages()]
            self._fingerprint = ws.fingerprint(self.stage, {"version": self.version, **self.settings()},
                                                      upstream)
        return self._fingerprint

    def complete(self):
        # luigi logs errors raised here (bad config values surface in fingerprint()) only as warnings
        try:
            check_every_section()
            if not super().complete():
                return False
            problem = self.output_problem()
            if problem:
                log.warning("%s is incomplete (%s): it will be recomputed", self.output().path, problem)
            return not problem
        except Exception as e:
            remember_failure(self, e)
            raise

    def output(self):
        root = workspace_root()
        return luigi.LocalTarget(str(root / self.stage / self.fingerprint()))

    def output_problem(self) -> str | None:
        """What is wrong with an existing output directory (a file missing or unreadable JSON), or None.
        Stages whose output is a single file (PlanShards, ExtractFeatures) check it in their targets."""
        path = self.output().path
        if not os.path.isdir(path):
            return None
        return ws.output_problem(path, ("provenance.json", *self.expected_files))

    @contextlib.contextmanager
    def atomic_output(self):
        """A temporary directory that becomes output() when the block succeeds, with provenance.json added.
        An incomplete output found by complete() is set aside first (.broken-<fp>-<time>, kept for inspection)."""
        if os.path.isdir(self.output().path) and self.output_problem():
            log.warning("set aside the incomplete %s as %s", self.output().path,
                        ws.set_aside(self.output().path))
        with ws.atomic_dir(self.output().path) as tmp:
            yield tmp
            manifests.write_json(tmp / "provenance.json", self.provenance())
        log.info("%s wrote %s", self.task_family, self.output().path)

    def provenance(self) -> dict:
        return {"stage": self.stage, "fingerprint": self.fingerprint(), "version": self.version,
                "settings": self.settings(), "upstream": {t.stage: t.fingerprint() for t in self.upstream_stages()}}


class SplitStage(Stage):
    """A stage run once per split whose splits share one directory: the fingerprint leaves the split out, so the
    val and test results of one model sit side by side (`<stage>/<fp>/{val,test}.json` + companions); the
    split's .json is written last and marks it complete."""
    split = luigi.ChoiceParameter(choices=list(manifests.SPLITS), default="test")
    companion = ""   # the file written beside each split's .json, e.g. "-attention.h5" for test-attention.h5

    @property
    def expected_files(self):
        return f"{self.split}.json", f"{self.split}{self.companion}"

    def directory(self) -> Path:
        return workspace_root() / self.stage / self.fingerprint()

    def output(self):
        return luigi.LocalTarget(str(self.directory() / f"{self.split}.json"))

    def output_problem(self) -> str | None:
        if not self.directory().is_dir():
            return None
        return ws.output_problem(self.directory(), ("provenance.json", *self.expected_files))

    @contextlib.contextmanager
    def atomic_output(self):
        """A temporary directory whose files replace this split's files in directory() when the block succeeds."""
        with ws.atomic_files(self.directory(), f"{self.split}.json") as tmp:
            yield tmp
            manifests.write_json(tmp / "provenance.json", self.provenance())
        log.info("%s wrote %s", self.task_family, self.output().path)


class ShardTarget(luigi.LocalTarget):
    """A shard exists when its file is there and passes the quick check (opens, schema, row counts), so a
    truncated or overwritten shard is extracted again."""

    def exists(self):
        return super().exists() and not shards.check_shard(self.path)


class SplitIndexTarget(luigi.LocalTarget):
    """A split index exists when its file is there and every shard it points to passes the quick check."""

    def exists(self):
        if not super().exists():
            return False
        index = manifests.read_json(self.path)
        return all(ShardTarget(str(Path(self.path).parents[2] / f"{name}.h5")).exists() for name in index["shards"])
