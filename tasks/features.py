"""The data half of the DAG: demo dataset → annotations → vocabulary; digits encoder → feature store.
Each output is `<workspace>/<stage>/<fingerprint>` (tasks/base.py); each run() calls the library."""
from __future__ import annotations

from pathlib import Path

import luigi

from pipeline import annotations, demo as demo_lib, encoder as encoder_lib, features as features_lib
from pipeline import pretrain as pretrain_lib, vocabulary as vocab_lib
from pipeline.progress import Progress
from storage import manifests, shards, workspace as ws
from storage.weights import CELL_HEAD_FILE
from tasks import context
from tasks.base import ReportsProgress, ShardTarget, SplitIndexTarget, Stage
from tasks.config import dataset, demo, encoder, features, pretrain, section_values, vocabulary, workspace_root


class MakeDemoDataset(Stage):
    """The built-in digits dataset in COCO captions format (see pipeline/demo.py)."""
    stage = "demo"
    expected_files = (*(f"captions_{s}.json" for s in manifests.SPLITS), "karpathy_split.json")
    version = 2

    def settings(self):
        c = demo.read()
        return {"train_images": c.train_images, "val_images": c.val_images, "test_images": c.test_images,
                "seed": c.seed}

    def run(self):
        s = self.settings()
        progress = Progress(sum(s[f"{k}_images"] for k in manifests.SPLITS), "demo dataset", "images",
                            self.report_progress)
        with self.atomic_output() as tmp:
            demo_lib.write_demo_dataset(tmp, **s, progress=lambda done, total: progress.update())


class ExtractAnnotations(Stage):
    """Stage 1: caption files → annotations/<fp>/{train,val,test}.jsonl + report.json."""
    stage = "annotations"
    expected_files = (*(f"{s}.jsonl" for s in manifests.SPLITS), manifests.REPORT_FILE)
    version = 4

    def requires(self):
        return [MakeDemoDataset()] if dataset.read().source == "demo" else []

    def inputs(self) -> tuple[list[str], list[str], str]:
        """(annotation files, image roots, karpathy split file or '')."""
        return context.annotation_inputs(Path(self.requires()[0].output().path) if self.requires() else None)

    def settings(self):
        files, _, karpathy = self.inputs()
        return context.annotation_settings(files, karpathy)

    def run(self):
        d = dataset.read()
        files, roots, karpathy = self.inputs()
        with self.atomic_output() as tmp:
            previous = manifests.latest_other_output(Path(self.output().path).parent, self.output().path)
            report = annotations.make_annotations(tmp, files, roots, karpathy or None, d.val_fraction,
                                                  d.test_fraction, d.seed, progress_callback=self.report_progress,
                                                  previous=previous, workspace_root=workspace_root())
        self.counts = {"splits": report["splits"], "problems": report["problem_counts"]}


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


class PretrainDigitsEncoder(Stage):
    """InceptionV3 pretrained on scikit-learn digits (the demo's train pool): encoders/<fp>/ with the weights
    file and report.json (held-out accuracy, steps, seconds). Feeds ExtractShard when [encoder] weights = digits."""
    stage = "encoders"
    version = 3
    expected_files = (pretrain_lib.WEIGHTS_FILE, CELL_HEAD_FILE, manifests.REPORT_FILE)

    def settings(self):
        # trained, batch-norm re-estimated and checked on scenes of the size the encoder will see, at its layer
        e = encoder.read()
        return {**section_values(pretrain), "pool_seed": demo.read().seed,
                "scene_size": e.image_size, "layer": encoder_lib.base_layer(e.layer)}

    def weights_path(self) -> Path:
        return Path(self.output().path) / pretrain_lib.WEIGHTS_FILE

    def run(self):
        with self.atomic_output() as tmp:
            report = pretrain_lib.pretrain(tmp, self.settings(), progress_callback=self.report_progress)
            manifests.write_json(tmp / "report.json", report)
        self.counts = {"held_out": report["held_out"], "seconds": report["seconds"]}


def encoder_identity() -> dict:
    """The configured weights, resolved (file hashed, imagenet located) once per process."""
    spec = encoder.read().weights
    if spec not in _identities:
        if context.uses_digits_encoder():
            task = PretrainDigitsEncoder()
            _identities[spec] = encoder_lib.digits_identity(task.weights_path(), task.fingerprint())
        else:
            _identities[spec] = encoder_lib.resolve_weights(spec)
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
    """One shard of a plan: features/<encoder-fp>/<shard>.h5. One GPU task at a time per host."""
    plan = luigi.Parameter()
    shard = luigi.Parameter()
    resources = {"gpu": 1}

    def requires(self):
        return PretrainDigitsEncoder() if context.uses_digits_encoder() else []

    def output(self):
        return ShardTarget(str(store_dir() / f"{self.shard}.h5"))

    def run(self):
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
        if not hasattr(self, "_shard_tasks"):   # requires() runs often; a COCO plan is megabytes of JSON
            plan = manifests.read_json(plan_path)
            self._shard_tasks = [ExtractShard(plan=plan["plan"], shard=s["name"]) for s in plan["shards"]
                                 if s["split"] == self.split]
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
        listing = features_lib.listing_digest(annotations_dir, self.split, context.image_root)
        keys = context.content_keys(annotations_dir, self.split)
        repair = features_lib.plan_repair(annotations_dir, store_dir(), self.split, features.read().shard_size, keys)
        if repair:   # a shard was damaged or deleted since the plan, or an image file replaced: those images again
            yield [ExtractShard(plan=repair["plan"], shard=s["name"]) for s in repair["shards"]]
        index = features_lib.index_split(annotations_dir, store_dir(), self.split, keys)
        manifests.write_json(self.output().path, {**index, "encoder": store_settings(), "listing": listing,
                                                  "plan": manifests.read_json(plan_path)["plan"],
                                                  "annotations": Path(annotations_dir).name})
