"""The pipeline's Luigi tasks: each output is `<workspace>/<stage>/<fingerprint>`, each run() calls the library."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import luigi

from pipeline import annotations, demo as demo_lib, encoder as encoder_lib, features as features_lib
from pipeline import folders as folders_lib
from pipeline import inputs, pretrain as pretrain_lib, vocabulary as vocab_lib
from pipeline.errors import InputError
from storage import manifests, shards, workspace as ws
from tasks.config import (check_every_section, comma_list, config_files, dataset, decoder, demo, encoder, evaluation,
                          features, generation, pretrain, section_values, training, vocabulary, workspace_root)
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


class MakeDemoDataset(Stage):
    """The built-in digits dataset in COCO captions format (see pipeline/demo.py)."""
    stage = "demo"
    expected_files = (*(f"captions_{s}.json" for s in manifests.SPLITS), "karpathy_split.json")
    version = 2   # 2: digit boxes in the images' metadata

    def settings(self):
        c = demo.read()
        return {"train_images": c.train_images, "val_images": c.val_images, "test_images": c.test_images,
                "seed": c.seed}

    def run(self):
        with self.atomic_output() as tmp:
            demo_lib.write_demo_dataset(tmp, **self.settings(), progress=self.demo_progress())

    def demo_progress(self):
        from pipeline.progress import Progress
        s = self.settings()
        progress = Progress(s["train_images"] + s["val_images"] + s["test_images"], "demo dataset", "images",
                            self.report_progress)
        return lambda done, total: progress.update()


class ExtractAnnotations(Stage):
    """Stage 1: caption files → annotations/<fp>/{train,val,test}.jsonl + report.json."""
    stage = "annotations"
    expected_files = (*(f"{s}.jsonl" for s in manifests.SPLITS), manifests.REPORT_FILE)
    version = 4   # 2: digit datasets' labels and boxes kept in the manifests; 3: hash splits, item-level problems;
    #               4: image roots as references (images:<k>), files identified by content only

    def requires(self):
        return [MakeDemoDataset()] if dataset.read().source == "demo" else []

    def inputs(self) -> tuple[list[str], list[str], str]:
        """(annotation files, image roots, karpathy split file or '')."""
        if dataset.read().source == "demo":
            root = Path(self.requires()[0].output().path)
            splits = manifests.SPLITS
            return ([str(root / f"captions_{s}.json") for s in splits], [str(root / s) for s in splits],
                    str(root / "karpathy_split.json"))
        d = dataset.read()
        return comma_list(d.annotations), comma_list(d.images), d.karpathy_split

    def settings(self):
        d = dataset.read()
        s = {"source": d.source, "seed": d.seed, "val_fraction": d.val_fraction, "test_fraction": d.test_fraction}
        if d.source == "coco":   # the demo's files are identified by its upstream fingerprint
            files, roots, karpathy = self.inputs()
            # by content, not by path: the files and image roots may move (another host, another mount)
            s["annotations"] = [_identify(f, "annotations") for f in files]
            s["karpathy_split"] = _identify(karpathy, "karpathy_split") if karpathy else ""
        if s.get("karpathy_split") or d.source == "demo":
            for key in ("seed", "val_fraction", "test_fraction"):   # unused with a split file
                s.pop(key)
        return s

    def run(self):
        d = dataset.read()
        files, roots, karpathy = self.inputs()
        with self.atomic_output() as tmp:
            previous = manifests.latest_other_output(Path(self.output().path).parent, self.output().path)
            report = annotations.make_annotations(tmp, files, roots, karpathy or None, d.val_fraction,
                                                  d.test_fraction, d.seed, progress_callback=self.report_progress,
                                                  previous=previous, workspace_root=workspace_root())
        self.counts = {"splits": report["splits"], "problems": report["problem_counts"]}


def dataset_image_roots() -> list[str]:
    """The current config's `[dataset] images` (what `images:<k>` root references resolve through)."""
    return [str(Path(r).expanduser().resolve()) for r in comma_list(dataset.read().images)]


def image_root(reference: str) -> Path:
    """The directory a manifest's root reference names under the current config (storage.manifests)."""
    try:
        return manifests.resolve_root(reference, workspace_root(), dataset_image_roots())
    except ValueError as e:
        raise InputError(f"{config_files()}: [dataset] images: {e}") from e


def _identify(path: str, key: str) -> str:
    """sha256 of an input file, or an InputError naming the [dataset] key when it cannot be read."""
    try:
        return ws.file_sha256(path)
    except OSError as e:
        raise InputError(f"{config_files()}: [dataset] {key}: cannot read {path}: {e.strerror}. "
                         "Fix: correct the path in the config.") from e


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
    expected_files = (pretrain_lib.WEIGHTS_FILE, manifests.REPORT_FILE)

    def settings(self):
        return {**section_values(pretrain), "pool_seed": demo.read().seed}

    def weights_path(self) -> Path:
        return Path(self.output().path) / pretrain_lib.WEIGHTS_FILE

    def run(self):
        with self.atomic_output() as tmp:
            report = pretrain_lib.pretrain(tmp, self.settings(), progress_callback=self.report_progress)
            manifests.write_json(tmp / "report.json", report)
        self.counts = {"held_out": report["held_out"], "seconds": report["seconds"]}


def uses_digits_encoder() -> bool:
    return encoder.read().weights.strip() == "digits"


def encoder_identity() -> dict:
    """The configured weights, resolved (file hashed, imagenet located) once per process."""
    spec = encoder.read().weights
    if spec not in _identities:
        if uses_digits_encoder():
            task = PretrainDigitsEncoder()
            _identities[spec] = encoder_lib.digits_identity(task.weights_path(), task.fingerprint())
        else:
            _identities[spec] = encoder_lib.resolve_weights(spec)
    return _identities[spec]


_identities: dict = {}


def store_settings() -> dict:
    """Everything that determines feature values: the encoder fingerprint covers exactly this."""
    identity = {k: v for k, v in encoder_identity().items() if k != "path"}   # a moved file is the same file
    return {"encoder": encoder_lib.ENCODER_NAME, **identity, "image_size": encoder.read().image_size,
            "preprocess": encoder_lib.PREPROCESS, "dtype": "float16", "schema_version": shards.SCHEMA_VERSION}




def store_dir() -> Path:
    """features/<encoder-fp>: shared by every annotation version, never mixes two encoders."""
    root = workspace_root()
    return root / "features" / ws.fingerprint("features", store_settings())


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
        plan = features_lib.plan_store(self.input().path, store_dir(), features.read().shard_size,
                                       self.fingerprint())
        manifests.write_json(self.output().path, plan, indent=None)


class ShardTarget(luigi.LocalTarget):
    """A shard exists when its file is there and passes the quick check (opens, schema, row counts), so a
    truncated or overwritten shard is extracted again."""

    def exists(self):
        return super().exists() and not shards.check_shard(self.path)


class ExtractShard(ReportsProgress, luigi.Task):
    """One shard of a plan: features/<encoder-fp>/<shard>.h5. One GPU task at a time per host."""
    plan = luigi.Parameter()
    shard = luigi.Parameter()
    resources = {"gpu": 1}

    def requires(self):
        return PretrainDigitsEncoder() if uses_digits_encoder() else []

    def output(self):
        return ShardTarget(str(store_dir() / f"{self.shard}.h5"))

    def run(self):
        self.counts = extract_planned_shard(self.plan, self.shard, self.report_progress)


def extract_planned_shard(plan_name: str, shard: str, progress_callback) -> dict:
    """Extract the shard `shard` of the plan `plan_name` with the configured encoder."""
    plan = manifests.read_json(store_dir() / "plans" / f"{plan_name}.json")
    entry = next(s for s in plan["shards"] if s["name"] == shard)
    e, f = encoder.read(), features.read()
    attrs = {"fingerprint": store_dir().name, "split": entry["split"], "plan": plan_name}
    roots = {root: str(image_root(root)) for root in {root for _, root, _ in entry["images"]}}
    images = [[i, roots[root], rel] for i, root, rel in entry["images"]]
    return features_lib.extract_shard(
        store_dir() / f"{shard}.h5", images, encoder_identity(), e.image_size, e.batch_size, attrs,
        None if f.compression == "none" else f.compression, e.decode_workers or None,
        progress_callback=progress_callback)


class SplitIndexTarget(luigi.LocalTarget):
    """A split index exists when its file is there and every shard it points to passes the quick check."""

    def exists(self):
        if not super().exists():
            return False
        index = manifests.read_json(self.path)
        return all(ShardTarget(str(Path(self.path).parents[2] / f"{name}.h5")).exists() for name in index["shards"])


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
        plan = manifests.read_json(plan_path)
        annotations_dir = self.requires()["plan"].input().path
        todo, _ = features_lib.images_to_extract(annotations_dir, store_dir(), self.split)
        if todo:   # a shard written by an earlier plan was damaged or deleted since: plan its images again
            name = "repair-" + ws.fingerprint("repair", {"images": [i for i, _, _ in todo]})
            repair = features_lib.plan_shards(name, {self.split: todo}, features.read().shard_size)
            manifests.write_json(store_dir() / "plans" / f"{name}.json", repair, indent=None)
            yield [ExtractShard(plan=name, shard=s["name"]) for s in repair["shards"]]
        index = features_lib.index_split(annotations_dir, store_dir(), self.split)
        manifests.write_json(self.output().path, {**index, "encoder": store_settings(), "plan": plan["plan"],
                                                  "annotations": Path(annotations_dir).name})




class TrainDecoder(Stage):
    """Train the decoder on the train split's features: models/<fp>/ (checkpoints in checkpoints/<fp>/)."""
    stage = "models"
    expected_files = ("decoder.weights.h5", "decoder.json", "vocab.json", "config.json", "features.json",
                      "history.json")
    version = 3   # 2: features standardised with train-set statistics; 3: loss per token, validation as generation

    def requires(self):
        return {"vocabulary": BuildVocabulary(), "train": ExtractFeatures(split="train"),
                "val": ExtractFeatures(split="val")}

    # Keys that change how training runs, not what it computes: not part of the fingerprint.
    operational = ("checkpoint_every", "val_batch_size", "cpu_devices", "verify_shards")

    def settings(self):
        values = {**section_values(decoder), **section_values(training), "decoding": validation_decoding()}
        return {k: v for k, v in values.items() if k not in self.operational}

    def run(self):
        from pipeline import train   # TensorFlow: imported by the worker that trains, never by the scheduler
        if training.read().verify_shards:   # never train on damaged features: re-extract them first
            yield from self.repair_damaged_shards()
        root = workspace_root()
        train_index = manifests.read_json(self.input()["train"].path)
        provenance = {"store": store_dir().name, "encoder": store_settings(), "positions": len_positions(),
                      "weights_path": (ws.portable(encoder_identity()["path"], root) if encoder_identity().get("path")
                                       else None),
                      "weights_sha256": (ws.file_sha256(encoder_identity()["path"]) if uses_digits_encoder()
                                         else encoder_identity().get("sha256")),
                      "train_index": ws.portable(self.input()["train"].path, root),
                      "val_index": ws.portable(self.input()["val"].path, root)}
        with self.atomic_output() as tmp:
            history = train.train_decoder(tmp, root / "checkpoints" / self.fingerprint(), store_dir(),
                                              train_index, manifests.read_json(self.input()["val"].path),
                                              self.requires()["vocabulary"].input().path,
                                              Path(self.input()["vocabulary"].path) / manifests.VOCAB_FILE,
                                              {**section_values(decoder), **section_values(training),
                                               "decoding": validation_decoding()}, provenance,
                                              progress_callback=self.report_progress)
        self.counts = {"epochs": len(history), "best_val_CIDEr": max((h["val_CIDEr"] for h in history), default=None)}


    def repair_damaged_shards(self):
        """Deep-check the shards the split indexes use; damaged ones are moved aside and their re-extraction is
        yielded to the scheduler (ExtractShard: [resources] hold). Luigi calls run() again once they are done;
        the indexes must then still find every image at its row, else they are removed and the run fails."""
        indexes = [manifests.read_json(self.input()[s].path) for s in ("train", "val")]
        damaged = features_lib.quarantine_damaged(store_dir(), indexes)
        if damaged:
            yield [ExtractShard(plan=features_lib.plan_of(name), shard=name) for name in damaged]
        used = sorted({name for index in indexes for name in index["shards"]})
        stale = {name: n for name in used if (n := features_lib.rows_changed(store_dir(), name, indexes))}
        if stale:   # an image decodes differently now: the split indexes must be rebuilt first
            for split in ("train", "val"):
                Path(self.input()[split].path).unlink(missing_ok=True)
            raise InputError(f"re-extracted shards {sorted(stale)}, but {sum(stale.values())} of their images moved "
                             "to other rows (an image file changed since). The split indexes were removed. Fix: rerun.")


def generation_settings() -> dict:
    """The [generation] values that change captions (not batch_size); an explicit model directory is
    identified by its weights."""
    g = section_values(generation)
    g.pop("batch_size")
    if g["model"]:
        g["model"] = ws.file_sha256(Path(g["model"]) / "decoder.weights.h5")
    return g


def checked_model_dir(model_dir) -> str:
    """`model_dir`, or an InputError when it was trained on another encoder's features than this config's."""
    trained_on = manifests.read_json(Path(model_dir) / "features.json")["store"]
    if trained_on != store_dir().name:
        raise InputError(f"[generation] model = {model_dir} was trained on features of encoder {trained_on}, "
                         f"but this config's encoder is {store_dir().name}. Fix: use the [encoder] settings "
                         "the model was trained with, or a model trained on this encoder.")
    return model_dir


def validation_decoding() -> dict:
    """The [generation] settings TrainDecoder validates with: the best epoch is the best for GenerateCaptions."""
    g = generation.read()
    return {"beam_size": g.beam_size, "max_length": g.max_length, "length_penalty": g.length_penalty,
            "suppress_unk": g.suppress_unk}


class GenerateCaptions(SplitStage):
    """Caption a split: captions/<fp>/<split>.json (COCO results format) + <split>-attention.h5; one directory
    per model and decoding, whatever the split."""
    stage, companion = "captions", "-attention.h5"
    version = 2   # 2: one directory for all splits

    def requires(self):
        needs = {"features": ExtractFeatures(split=self.split)}
        if not generation.read().model:
            needs["model"] = TrainDecoder()
        return needs

    def settings(self):
        return generation_settings()

    def upstream_stages(self):
        """The model and the split-independent feature plan (not the split's index): one fingerprint for all
        splits."""
        needs = self.requires()
        return [needs["features"].requires()["plan"], *([needs["model"]] if "model" in needs else [])]

    def run(self):
        from pipeline import decode
        g = generation.read()
        model_dir = checked_model_dir(g.model or self.input()["model"].path)
        index = manifests.read_json(self.input()["features"].path)
        results, ids, tokens, attention = decode.generate(
            model_dir, inputs.shard_rows(store_dir(), index), g.beam_size, g.max_length, g.length_penalty,
            g.suppress_unk, g.batch_size, progress_callback=self.report_progress)
        records = manifests.read_manifest(
            manifests.manifest_path(self.requires()["features"].requires()["plan"].input().path, self.split))
        paths = {r["image_id"]: f"{r['root']}/{r['path']}" for r in records}   # root references, as manifests
        with self.atomic_output() as tmp:
            manifests.write_json(tmp / f"{self.split}.json", results)
            shards.write_attention(tmp / f"{self.split}-attention.h5", ids, [paths[int(i)] for i in ids], tokens,
                                   attention, {"model": ws.portable(model_dir, workspace_root()),
                                               "beam_size": g.beam_size, "image_roots": dataset_image_roots()})


class CaptionImages(Stage):
    """Caption every image under a folder, incrementally: folders/<fp>/captions.jsonl (+ .csv, attention.h5,
    listing.json, report.json). The fingerprint covers the folder's listing (paths, sizes, mtimes), so a changed
    folder is a new output; features (by content) and captions of files seen before are reused
    (pipeline/folders.py). Extraction and decoding hold the GPU."""
    stage = "folders"
    images = luigi.Parameter(description="folder of images to caption (searched recursively)")
    expected_files = folders_lib.FILES
    resources = {"gpu": 1}

    def requires(self):
        needs = {"pretrained": PretrainDigitsEncoder()} if uses_digits_encoder() else {}
        if not generation.read().model:
            needs["model"] = TrainDecoder()
        return needs

    def folder(self) -> Path:
        folder = Path(self.images).expanduser().resolve()
        if not folder.is_dir():
            raise InputError(f"--images {self.images}: no such folder. Fix: give the folder of images to caption.")
        return folder

    def listing(self) -> dict:
        if not hasattr(self, "_listing"):
            self._listing = folders_lib.list_images(self.folder())
        return self._listing

    def base_settings(self) -> dict:
        return {**generation_settings(), "folder": str(self.folder()), "store": store_dir().name}

    def settings(self):
        return {**self.base_settings(), "listing": folders_lib.listing_fingerprint(self.listing())}

    def previous_output(self) -> Path | None:
        """The newest earlier output for the same folder, model and decoding (what a rerun reuses)."""
        base, upstream = self.base_settings(), {t.stage: t.fingerprint() for t in self.upstream_stages()}
        candidates = []
        for d in (workspace_root() / self.stage).glob("[!.]*"):
            if d.name == self.fingerprint() or ws.output_problem(d, ("provenance.json", *self.expected_files)):
                continue
            provenance = manifests.read_json(d / "provenance.json")
            settings = {k: v for k, v in provenance["settings"].items() if k != "listing"}
            if settings == base and provenance["upstream"] == upstream:
                candidates.append(d)
        return max(candidates, key=lambda d: d.stat().st_mtime, default=None)

    def run(self):
        from pipeline import decode
        g, e, f = generation.read(), encoder.read(), features.read()
        model_dir = checked_model_dir(g.model or self.input()["model"].path)
        store = store_dir() / "folders"
        plan = f"folder-{self.fingerprint()}"
        extract = lambda path, images: features_lib.extract_shard(
            path, images, encoder_identity(), e.image_size, e.batch_size,
            {"fingerprint": store_dir().name, "split": "folder", "plan": plan},
            None if f.compression == "none" else f.compression, e.decode_workers or None,
            progress_callback=self.report_progress)
        rows = lambda index: decode.caption_rows(model_dir, inputs.shard_rows(store, index), g.beam_size,
                                                 g.max_length, g.length_penalty, g.suppress_unk, g.batch_size,
                                                 progress_callback=self.report_progress)
        with self.atomic_output() as tmp:
            report = folders_lib.caption_folder(tmp, self.folder(), self.listing(), self.previous_output(), store,
                                                extract, rows, f.shard_size, f"shard-{plan}")
        self.counts = {k: report[k] for k in ("images", "captioned", "extracted", "decoded", "reused_captions")}
        self.counts["skipped"] = len(report["skipped"])


class EvaluateCaptions(SplitStage):
    """Score a split's captions: metrics/<fp>/<split>.json and <split>-report.html, one directory per captions
    directory."""
    stage, companion = "metrics", "-report.html"
    version = 2   # 2: one directory for all splits

    def requires(self):
        return {"captions": GenerateCaptions(split=self.split), "annotations": ExtractAnnotations()}

    def settings(self):
        e = evaluation.read()
        return {"spice": e.spice, "java": e.java}

    def run(self):
        from pipeline import evaluate
        e = evaluation.read()
        captions = Path(self.input()["captions"].path).parent
        with self.atomic_output() as tmp:
            metrics = evaluate.evaluate_split(tmp, self.split, captions / f"{self.split}.json",
                                              captions / f"{self.split}-attention.h5",
                                              manifests.manifest_path(self.input()["annotations"].path, self.split),
                                              java={"auto": None, "yes": True, "no": False}[e.java],
                                              spice=e.spice, examples=e.report_examples,
                                              dataset_roots=dataset_image_roots(), about=self.about())
        self.counts = metrics["corpus"]

    def about(self) -> dict:
        """What the report evaluates: model, encoder, decoding and config, for the report's head."""
        captions = self.requires()["captions"]
        g, identity = generation.read(), encoder_identity()
        model = g.model or captions.requires()["model"].output().path
        weights = identity.get("pretrained_on") or identity.get("path") or f"random:{identity.get('seed')}"
        return {"model": model, "captions": str(captions.directory()),
                "encoder": f"InceptionV3 ({identity['weights']}: {weights}), features {store_dir().name}",
                "decoding": f"beam {g.beam_size}, max length {g.max_length}, length penalty {g.length_penalty}, "
                            f"<unk> suppressed: {g.suppress_unk}",
                "config": config_files()}


def len_positions() -> int:
    return encoder_lib.grid_size(encoder.read().image_size) ** 2
