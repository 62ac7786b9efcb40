"""The Luigi base classes of every stage: a fingerprinted output directory written atomically, progress
forwarded to Luigi, and the targets that check feature shards quickly."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path

import luigi

from pipeline import listing
from storage import manifests, shards, workspace as ws
from tasks import context
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

    def settings(self) -> dict:
        """The significant settings of this stage (upstream ones enter through upstream fingerprints)."""
        raise NotImplementedError

    def upstream_stages(self) -> list["Stage"]:
        return [t for t in luigi.task.flatten(self.requires()) if isinstance(t, Stage)]

    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            upstream = [t.fingerprint() for t in self.upstream_stages()]
            self._fingerprint = ws.fingerprint(self.stage, {"version": self.version, **self.settings()},
                                                      upstream)
        return self._fingerprint

    def complete(self):
        """The output exists, is whole and was made from the inputs as they are now; and so is every upstream
        stage's (a rerun notices an image replaced under its name however far downstream it was asked for)."""
        # luigi logs errors raised here (bad config values surface in fingerprint()) only as warnings
        try:
            check_every_section()
            if not super().complete():
                return False
            problem = self.output_problem()
            if problem:
                if (self.output().path, problem) not in _warned:   # luigi asks several times while it schedules
                    _warned.add((self.output().path, problem))
                    log.warning("%s is incomplete (%s): it will be recomputed", self.output().path, problem)
                return False
            return all(t.complete() for t in self.upstream_stages())
        except Exception as e:
            remember_failure(self, e)
            raise

    def output(self):
        root = workspace_root()
        return luigi.LocalTarget(str(root / self.stage / self.fingerprint()))

    def output_problem(self) -> str | None:
        """What is wrong with an existing output directory (a file missing or unreadable JSON, inputs changed
        since it was made), or None. Stages whose output is a single file (PlanShards, ExtractFeatures) check it
        in their targets."""
        path = self.output().path
        if not os.path.isdir(path):
            return None
        return (ws.output_problem(path, ("provenance.json", *self.expected_files))
                or self.inputs_problem(manifests.read_json(Path(path) / "provenance.json")))

    def inputs_digest(self) -> str | None:
        """sha256 of what run() read: each input JSON file's bytes (split indexes, plans, captions) and each input
        directory's provenance.json (which holds its own inputs' digest, so a change propagates downstream).
        None while an input is missing."""
        digest = hashlib.sha256()
        for target in luigi.task.flatten(self.input()):
            path = Path(target.path)
            path = path / "provenance.json" if path.is_dir() else path
            if path.suffix != ".json":   # shards: checked by their targets, named by the split indexes
                continue
            if not path.is_file():
                return None
            digest.update(f"{path.name} {ws.file_sha256(path)}\n".encode())
        return digest.hexdigest()

    def recorded_inputs(self, provenance: dict) -> str | None:
        return provenance.get("inputs")

    def inputs_problem(self, provenance: dict) -> str | None:
        """Why an output is stale: a split index it read no longer matches the images on disk, or an input
        differs from the one it was made from."""
        for target in luigi.task.flatten(self.input()):
            if isinstance(target, SplitIndexTarget) and os.path.isfile(target.path) and not target.exists():
                return f"the images or features of {target.path} changed since"
        recorded, current = self.recorded_inputs(provenance), self.inputs_digest()
        if recorded and current and recorded != current:
            return "its inputs changed since it was made"
        return None

    @contextlib.contextmanager
    def atomic_output(self):
        """A temporary directory that becomes output() when the block succeeds, with provenance.json added.
        An output there already (incomplete, stale, or made from an upstream output that was itself remade) is
        set aside only then, as it is replaced (.broken-<fp>-<time>, kept for inspection): a run that fails
        leaves it where it was."""
        replaced = []
        with ws.atomic_dir(self.output().path, replaced) as tmp:
            yield tmp
            manifests.write_json(tmp / "provenance.json", self.provenance())
        for path in replaced:
            log.warning("set aside the earlier %s as %s", self.output().path, path)
        log.info("%s wrote %s", self.task_family, self.output().path)

    def provenance(self) -> dict:
        return {"stage": self.stage, "fingerprint": self.fingerprint(), "version": self.version,
                "settings": self.settings(), "upstream": {t.stage: t.fingerprint() for t in self.upstream_stages()},
                "inputs": self.inputs_digest()}


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
        return (ws.output_problem(self.directory(), ("provenance.json", *self.expected_files))
                or self.inputs_problem(manifests.read_json(self.directory() / "provenance.json")))

    def recorded_inputs(self, provenance: dict) -> str | None:
        return (provenance.get("inputs") or {}).get(self.split)

    def provenance(self) -> dict:
        """As Stage's, with the inputs digest of each split made so far (the splits share the file)."""
        previous = self.directory() / "provenance.json"
        inputs = manifests.read_json(previous).get("inputs") or {} if previous.is_file() else {}
        return {**super().provenance(), "inputs": {**inputs, self.split: self.inputs_digest()}}

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
    """A split index exists when its file is there, every shard it points to passes the quick check, and the
    split's image files have the sizes and mtimes they had when it was made (else one was replaced, added or
    removed: its content key may have changed)."""

    def exists(self):
        if not super().exists():
            return False
        index = manifests.read_json(self.path)
        if not all(ShardTarget(str(Path(self.path).parents[2] / f"{name}.h5")).exists() for name in index["shards"]):
            return False
        return index.get("listing") == _listing_now(self.path, index)


_warned: set = set()   # (output, problem) already logged by Stage.complete in this process
_listings: dict = {}   # (index path, its mtime) → (when, the listing digest of its split's files)


def _listing_now(index_path: str, index: dict) -> str:
    """The split's listing digest as the files are now. Luigi asks for completeness several times while it
    schedules, so a digest is reused for a few seconds (each is a stat of every image of the split)."""
    key = (index_path, os.stat(index_path).st_mtime_ns)
    when, digest = _listings.get(key, (0.0, None))
    if time.monotonic() - when > 10:
        annotations = workspace_root() / "annotations" / index["annotations"]
        digest = listing.listing_digest(annotations, index["split"], context.image_root)
        _listings[key] = (time.monotonic(), digest)
    return digest
