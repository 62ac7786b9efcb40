"""The data half of the DAG: [a plug-in's dataset →] annotations → vocabulary; [a plug-in's weights →] feature
store.
Each output is `<workspace>/<stage>/<fingerprint>` (tasks/base.py); each run() calls the library."""
from __future__ import annotations

import functools
from pathlib import Path

import luigi

from pipeline import annotations, encoder as encoder_lib, features as features_lib, listing, vocabulary as vocab_lib
from storage import contents, manifests, shards, workspace as ws
from tasks import context
from tasks.base import ReportsProgress, ShardTarget, SplitIndexTarget, Stage
from tasks.config import dataset, encoder, features, load_plugins, vocabulary, workspace_root


class ExtractAnnotations(Stage):
    """Stage 1: caption files → annotations/<fp>/{train,val,test}.jsonl + report.json."""
    stage = "annotations"
    expected_files = (*(f"{s}.jsonl" for s in manifests.SPLITS), manifests.REPORT_FILE)
    version = 4

    def requires(self):
        written = context.dataset_stage()
        return [written] if written is not None else []

    def inputs(self) -> tuple[list[str], list[str], str]:
        """(annotation files, image roots, karpathy split file or '')."""
        return context.annotation_inputs(Path(self.requires()[0].output().path) if self.requires() else None)

    def settings(self):
        files, _, karpathy = self.inputs()
        return context.annotation_settings(files, karpathy)

    def output_problem(self) -> str | None:
        """Stage's checks, and: an image file appeared or vanished since the manifests were written, so they would
        leave out an image the dataset has, or list one it lost (_image_files_changed)."""
        problem = super().output_problem()
        out = Path(self.output().path)
        if problem is not None or not (out / manifests.REPORT_FILE).is_file():
            return problem
        return _image_files_changed(out)

    def run(self):
        d = dataset.read()
        load_plugins()   # their image fields are kept in the manifests
        files, roots, karpathy = self.inputs()
        with self.atomic_output() as tmp:
            previous = manifests.earlier_outputs(Path(self.output().path).parent, self.output().path)
            report = annotations.make_annotations(tmp, files, roots, karpathy or None, d.val_fraction,
                                                  d.test_fraction, d.seed, progress_callback=self.report_progress,
                                                  previous=previous, workspace_root=workspace_root())
            self.written = {split: ws.file_sha256(manifests.manifest_path(tmp, split)) for split in manifests.SPLITS}
        self.counts = {"splits": report["splits"], "problems": report["problem_counts"]}

    def provenance(self) -> dict:
        """Stage's, and the manifests' sha256: the annotations are remade under the same fingerprint when image
        files come or go, and the stages below must see that they changed (their inputs digest reads this)."""
        return {**super().provenance(), "manifests": getattr(self, "written", None)}


_checked: dict = {}   # (annotations output, its report's mtime) → _image_files_changed's answer, in this process


def _image_files_changed(out: Path) -> str | None:
    """An image file the annotations in `out` found missing that is there now (copied in after a first run), or
    one they list that is gone (files deleted, a folder unmounted: the rerun reports them missing, and stops
    when a root holds none of its images); None when neither. Every file is checked (missing_images.jsonl; an
    output written before that file: the report's first listed ones), by stats in threads, once per process and
    version of the output: luigi asks for completeness many times while it schedules."""
    key = (str(out), (out / manifests.REPORT_FILE).stat().st_mtime_ns)
    if key not in _checked:
        if (out / manifests.MISSING_FILE).is_file():
            root = functools.cache(context.image_root)   # the reference a manifest would name the root by
            missing = [root(m["root"]) / m["path"] for m in manifests.iter_manifest(out / manifests.MISSING_FILE)]
        else:
            report = manifests.read_json(out / manifests.REPORT_FILE)
            missing = [Path(m["root"]) / m["path"] for m in report["problems"].get("missing_image_file", [])]
        there = [path for path, found in zip(missing, contents.stat_files(list(map(str, missing)), absent=OSError))
                 if found is not None and path.is_file()]
        vanished = listing.vanished_image(out, context.image_root) if not there else None
        _checked[key] = (f"{there[0].name} under {there[0].parent}, missing then, is there now" if there else
                         f"{vanished}, there then, is missing now" if vanished else None)
    return _checked[key]


class BuildVocabulary(Stage):
    """Stage 2: train split → vocabulary/<fp>/vocab.json."""
    stage = "vocabulary"
    expected_files = (manifests.VOCAB_FILE,)

    def requires(self):
        return ExtractAnnotations()

    def settings(self):
        v = vocabulary.read()
        return {"min_count": v.min_count, "max_size": v.max_size, "max_length": v.max_length,
                "length_policy": v.length_policy}

    def run(self):
        with self.atomic_output() as tmp:
            vocab_lib.make_vocabulary(self.input().path, tmp, **self.settings())


def encoder_identity() -> dict:
    """The configured weights, resolved (file hashed, imagenet located) once per process."""
    spec = encoder.read().weights
    if spec not in _identities:
        stage = context.weights_stage()
        _identities[spec] = stage.identity() if stage is not None else encoder_lib.resolve_weights(spec)
    return _identities[spec]


_identities: dict = {}


def store_settings() -> dict:
    """Everything that determines feature values: the encoder fingerprint covers exactly this."""
    identity = {k: v for k, v in encoder_identity().items() if k != "path"}   # a moved file is the same file
    e = encoder.read()
    return {"encoder": encoder_lib.encoder_name(e.layer), **identity, "image_size": e.image_size,
            "preprocess": encoder_lib.PREPROCESS, "precision": e.precision, "dtype": "float16",
            "schema_version": shards.SCHEMA_VERSION}


def store_dir() -> Path:
    """features/<encoder-fp>: shared by every annotation version, never mixes two encoders."""
    return workspace_root() / "features" / ws.fingerprint("features", store_settings())


def extraction_options() -> dict:
    """pipeline.features.extract_shard's encoder and I/O arguments under the current config."""
    e = encoder.read()
    return {"identity": encoder_identity(), "image_size": e.image_size, "layer": e.layer, "batch_size": e.batch_size,
            "precision": e.precision, "compression": features.read().compression, "workers": e.decode_workers or None}


class PlanShards(Stage):
    """Which images of this annotation version the store lacks, grouped into shards:
    features/<encoder-fp>/plans/<fp>.json."""
    stage = "plan"

    def requires(self):
        return ExtractAnnotations()

    def settings(self):
        return {"store": store_dir().name, "shard_size": features.read().shard_size}

    def output(self):
        return luigi.LocalTarget(str(store_dir() / "plans" / f"{self.fingerprint()}.json"))

    def run(self):
        features_lib.note_older_stores(store_dir())
        with context.content_cache() as cache:
            features_lib.plan_store(self.input().path, store_dir(), features.read().shard_size, self.fingerprint(),
                                    context.image_root, cache, self.output().path, self.report_progress)


class ExtractShard(ReportsProgress, luigi.Task):
    """One shard of a plan: features/<encoder-fp>/<shard>.h5. One GPU task at a time per scheduler ([resources] gpu)."""
    plan = luigi.Parameter()
    shard = luigi.Parameter()
    resources = {"gpu": 1}

    def requires(self):
        stage = context.weights_stage()
        return stage if stage is not None else []

    def output(self):
        return ShardTarget(str(store_dir() / f"{self.shard}.h5"))

    def run(self):
        load_plugins()   # a `+<extra>` layer's channels come from a plug-in
        self.counts = features_lib.extract_planned_shard(store_dir(), self.plan, self.shard, context.image_root,
                                                         extraction_options(), self.report_progress)


class ExtractFeatures(Stage):
    """InceptionV3 features of one split: extracts the plan's shards of that split, then writes
    features/<encoder-fp>/splits/<plan-fp>/<split>.json (image id → [shard, row], skipped images)."""
    stage = "features"
    split = luigi.ChoiceParameter(choices=list(manifests.SPLITS), default="train")

    def requires(self):
        plan = PlanShards()
        # Shards are static dependencies when the plan already exists at scheduling, so workers of a central
        # scheduler share them (run PlanShards first on a cluster); otherwise run() yields them once the plan is
        # written. Decided once per task: luigi calls requires() again at run time and it must not change.
        if not hasattr(self, "_static_shards"):
            self._static_shards = self.shard_tasks(plan.output().path) if plan.complete() else []
        return {"plan": plan, "shards": self._static_shards}

    def shard_tasks(self, plan_path) -> list:
        """The plan's shards of this split, and the other splits' shards that hold some of its pictures (planned
        once: extracted there, not again for this split)."""
        if not hasattr(self, "_shard_tasks"):   # requires() runs often; a COCO plan is megabytes of JSON
            plan = manifests.read_json(plan_path)
            shared = set(plan.get("shared_from", {}).get(self.split, []))
            self._shard_tasks = [ExtractShard(plan=plan["plan"], shard=s["name"]) for s in plan["shards"]
                                 if s["split"] == self.split or s["name"] in shared]
        return self._shard_tasks

    def settings(self):
        return {"split": self.split}

    def output(self):
        plan = self.requires()["plan"]
        return SplitIndexTarget(str(store_dir() / "splits" / plan.fingerprint() / f"{self.split}.json"))

    def run(self):
        plan_path = self.input()["plan"].path
        yield self.shard_tasks(plan_path)
        annotations_dir = self.requires()["plan"].input().path
        listing_now = listing.listing_digest(annotations_dir, self.split, context.image_root)
        keys = context.content_keys(annotations_dir, self.split)
        repair = features_lib.plan_repair(annotations_dir, store_dir(), self.split, features.read().shard_size, keys)
        if repair:   # a shard was damaged or deleted since the plan, or an image file replaced: those images again
            yield [ExtractShard(plan=repair["plan"], shard=s["name"]) for s in repair["shards"]]
        index = features_lib.index_split(annotations_dir, store_dir(), self.split, keys)
        manifests.write_json(self.output().path, {**index, "encoder": store_settings(), "listing": listing_now,
                                                  "plan": manifests.read_json(plan_path)["plan"],
                                                  "annotations": Path(annotations_dir).name})
