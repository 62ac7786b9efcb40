"""The model half of the DAG: TrainDecoder → GenerateCaptions → EvaluateCaptions, and CaptionImages for any folder.
Each output is `<workspace>/<stage>/<fingerprint>` (tasks/base.py); each run() calls the library."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import luigi

from pipeline import features as features_lib, folders as folders_lib, inputs
from pipeline.errors import InputError
from storage import manifests, shards, workspace as ws
from tasks import context
from tasks.base import SplitStage, Stage
from tasks.config import (config_files, decoder, encoder, evaluation, features, generation, load_plugins,
                          section_values, training, workspace_root)
from tasks.features import (BuildVocabulary, ExtractAnnotations, ExtractFeatures, ExtractShard, encoder_identity,
                            extraction_options, store_dir, store_settings)


log = logging.getLogger("captioner")

class TrainDecoder(Stage):
    """Train the decoder on the train split's features: models/<fp>/ (checkpoints in checkpoints/<fp>/)."""
    stage = "models"
    expected_files = ("decoder.weights.h5", "decoder.json", "vocab.json", "config.json", "features.json",
                      "history.json")
    version = 3

    def requires(self):
        return {"vocabulary": BuildVocabulary(), "train": ExtractFeatures(split="train"),
                "val": ExtractFeatures(split="val")}

    # Keys that change how training runs, not what it computes: not part of the fingerprint.
    operational = ("checkpoint_every", "val_batch_size", "cpu_devices", "verify_shards")

    def training_settings(self) -> dict:
        return {**section_values(decoder), **section_values(training), "decoding": context.validation_decoding()}

    def settings(self):
        values = self.training_settings()
        # the keys of a part turned off are not part of the fingerprint
        unused = {k for k in values if k.startswith("scst_")} if not values.get("scst_epochs") else set()
        unused |= {k for k in ("min_steps", "query_word") if not values.get(k)}
        return {**{k: v for k, v in values.items() if k not in self.operational and k not in unused},
                **context.plugin_settings()}   # their val scores, selection and rewards

    def run(self):
        from pipeline import train   # TensorFlow: imported by the worker that trains, never by the scheduler
        load_plugins()
        indexes = {s: manifests.read_json(self.input()[s].path) for s in ("train", "val")}
        if training.read().verify_shards:   # never train on damaged features: re-extract them first
            yield from self.repair_damaged_shards(list(indexes.values()))
        with self.atomic_output() as tmp:
            history = train.train_decoder(tmp, self.checkpoint_dir(), store_dir(),
                                          indexes["train"], indexes["val"], self.requires()["vocabulary"].input().path,
                                          Path(self.input()["vocabulary"].path) / manifests.VOCAB_FILE,
                                          self.training_settings(), self.features_provenance(),
                                          progress_callback=self.report_progress)
        kept = [h for h in history if h["best"]][-1:]
        self.counts = {"epochs": len(history), "kept_epoch": kept[0]["epoch"] if kept else None,
                       "best_val_CIDEr": max((h["val_CIDEr"] for h in history), default=None)}

    def checkpoint_dir(self) -> Path:
        """checkpoints/<fp>, emptied first when its checkpoints were trained on other inputs (an image replaced
        since): a resumed run must never continue another training."""
        directory = workspace_root() / "checkpoints" / self.fingerprint()
        marker, inputs = directory / "inputs.txt", self.inputs_digest()
        if directory.is_dir() and (not marker.is_file() or marker.read_text().strip() != inputs):
            log.warning("%s holds the checkpoints of a training on other inputs: removed, training starts afresh",
                        directory)
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(inputs + "\n")
        return directory

    def features_provenance(self) -> dict:
        """The model's features.json: the store, the encoder and its weights file, the split indexes."""
        root, identity = workspace_root(), encoder_identity()
        path = identity.get("path")
        return {"store": store_dir().name, "encoder": store_settings(), "positions": context.len_positions(),
                "weights_path": ws.portable(path, root) if path else None,
                "weights_sha256": ws.file_sha256(path) if "stage" in identity else identity.get("sha256"),
                "train_index": ws.portable(self.input()["train"].path, root),
                "val_index": ws.portable(self.input()["val"].path, root)}

    def repair_damaged_shards(self, indexes: list[dict]):
        """Deep-check the shards the split indexes use; damaged ones are moved aside and their re-extraction is
        yielded to the scheduler (ExtractShard: [resources] hold). Luigi calls run() again once they are done;
        the indexes must then still find every image at its row, else they are removed and the run fails. So
        does a damaged shard its plan no longer lists (the plan was written again since): the rerun's indexes
        find its images anew, extracting them."""
        damaged = features_lib.quarantine_damaged(store_dir(), indexes)
        planned = [name for name in damaged if features_lib.in_plan(store_dir(), name)]
        if len(planned) < len(damaged):
            for split in ("train", "val"):
                Path(self.input()[split].path).unlink(missing_ok=True)
            raise InputError(f"damaged shards {sorted(set(damaged) - set(planned))} were set aside; no plan lists them "
                             "now, so the split indexes were removed. Fix: rerun (it extracts their images again).")
        if planned:
            yield [ExtractShard(plan=features_lib.plan_of(name), shard=name) for name in planned]
        used = sorted({name for index in indexes for name in index["shards"]})
        stale = {name: n for name in used if (n := features_lib.rows_changed(store_dir(), name, indexes))}
        if stale:   # an image decodes differently now: the split indexes must be rebuilt first
            for split in ("train", "val"):
                Path(self.input()[split].path).unlink(missing_ok=True)
            raise InputError(f"re-extracted shards {sorted(stale)}, but {sum(stale.values())} of their images moved "
                             "to other rows (an image file changed since). The split indexes were removed. Fix: rerun.")


def checked_model_dir(model_dir) -> str:
    """`model_dir`, or an InputError when it was trained on another encoder's features than this config's."""
    trained_on = manifests.read_json(Path(model_dir) / "features.json")["store"]
    if trained_on != store_dir().name:
        raise InputError(f"[generation] model = {model_dir} was trained on features of encoder {trained_on}, "
                         f"but this config's encoder is {store_dir().name}. Fix: use the [encoder] settings "
                         "the model was trained with, or a model trained on this encoder.")
    return model_dir


def decoding_arguments() -> tuple:
    """(beam_size, max_length, length_penalty, suppress_unk, batch_size) of [generation], in the order
    pipeline.decode.generate and caption_rows take them."""
    g = generation.read()
    return g.beam_size, g.max_length, g.length_penalty, g.suppress_unk, g.batch_size


class GenerateCaptions(SplitStage):
    """Caption a split: captions/<fp>/<split>.json (COCO results format) + <split>-attention.h5; one directory
    per model and decoding, whatever the split."""
    stage, companion = "captions", "-attention.h5"
    version = 2

    def requires(self):
        needs = {"features": ExtractFeatures(split=self.split)}
        if not generation.read().model:
            needs["model"] = TrainDecoder()
        return needs

    def settings(self):
        return context.generation_settings()

    def upstream_stages(self):
        """The model and the split-independent feature plan (not the split's index): one fingerprint for all
        splits."""
        needs = self.requires()
        return [needs["features"].requires()["plan"], *([needs["model"]] if "model" in needs else [])]

    def run(self):
        from pipeline import decode
        model_dir = checked_model_dir(generation.read().model or self.input()["model"].path)
        index = manifests.read_json(self.input()["features"].path)
        results, ids, tokens, attention = decode.generate(model_dir, inputs.shard_rows(store_dir(), index),
                                                          *decoding_arguments(), progress_callback=self.report_progress)
        records = manifests.read_manifest(
            manifests.manifest_path(self.requires()["features"].requires()["plan"].input().path, self.split))
        paths = {r["image_id"]: f"{r['root']}/{r['path']}" for r in records}   # root references, as manifests
        with self.atomic_output() as tmp:
            manifests.write_json(tmp / f"{self.split}.json", results)
            shards.write_attention(tmp / f"{self.split}-attention.h5", ids, [paths[int(i)] for i in ids], tokens,
                                   attention, {"model": ws.portable(model_dir, workspace_root()),
                                               "beam_size": generation.read().beam_size,
                                               "image_roots": context.dataset_image_roots(),
                                               "layer": encoder.read().layer})


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
        stage = context.weights_stage()
        needs = {"pretrained": stage} if stage is not None else {}
        if not generation.read().model:
            needs["model"] = TrainDecoder()
        return needs

    def folder(self) -> Path:
        folder = Path(self.images).expanduser().resolve()
        if folder.is_file():
            raise InputError(f"--images {self.images}: is a file; --images takes a folder. Fix: give its folder, or "
                             f"caption single files with `captioner caption {self.images} --model work/models/<fp>`.")
        if not folder.is_dir():
            raise InputError(f"--images {self.images}: no such folder. Fix: give the folder of images to caption.")
        return folder

    def listing(self) -> dict:
        if not hasattr(self, "_listing"):
            self._listing = folders_lib.list_images(self.folder())
            if not self._listing:
                raise InputError(f"--images {self.images}: no image files in it (looked for "
                                 f"{' '.join(sorted(folders_lib.IMAGE_SUFFIXES))}, recursively). Fix: give the "
                                 "folder that holds the images.")
        return self._listing

    def base_settings(self) -> dict:
        return {**context.generation_settings(), "folder": str(self.folder()), "store": store_dir().name}

    def settings(self):
        return {**self.base_settings(), "listing": folders_lib.listing_fingerprint(self.listing())}

    def run(self):
        from pipeline import decode
        load_plugins()   # a `+<extra>` layer's channels come from a plug-in
        model_dir = checked_model_dir(generation.read().model or self.input()["model"].path)
        store, plan = store_dir(), f"folder-{self.fingerprint()}"
        extract = lambda path, images: features_lib.extract_shard(
            path, images, attrs={"fingerprint": store_dir().name, "split": "folder", "plan": plan},
            progress_callback=self.report_progress, **extraction_options())
        rows = lambda index: decode.caption_rows(model_dir, inputs.shard_rows(store, index), *decoding_arguments(),
                                                 progress_callback=self.report_progress)
        previous = folders_lib.previous_output(workspace_root() / self.stage, self.fingerprint(), self.base_settings(),
                                               {t.stage: t.fingerprint() for t in self.upstream_stages()})
        with self.atomic_output() as tmp, context.content_cache() as cache:
            report = folders_lib.caption_folder(tmp, self.folder(), self.listing(), previous, store, cache, extract,
                                                rows, features.read().shard_size, f"shard-{plan}",
                                                encoder.read().layer)
        self.counts = {k: report[k] for k in ("images", "captioned", "extracted", "decoded", "reused_captions")}
        self.counts["skipped"] = len(report["skipped"])


class EvaluateCaptions(SplitStage):
    """Score a split's captions: metrics/<fp>/<split>.json and <split>-report.html, one directory per captions
    directory."""
    stage, companion = "metrics", "-report.html"
    version = 2

    def requires(self):
        return {"captions": GenerateCaptions(split=self.split), "annotations": ExtractAnnotations()}

    def settings(self):
        """Java as resolved (auto: whether this host has it), since it picks the tokenizer and METEOR; the
        report's examples; the plug-ins (their metrics)."""
        from pipeline.evaluate import java_available
        e = evaluation.read()
        java = e.java if e.java != "auto" else "yes" if java_available() else "no"
        return {"spice": e.spice, "java": java, "report_examples": e.report_examples, **context.plugin_settings()}

    def run(self):
        from pipeline import evaluate
        e = evaluation.read()
        load_plugins()
        captions = Path(self.input()["captions"].path).parent
        with self.atomic_output() as tmp:
            metrics = evaluate.evaluate_split(tmp, self.split, captions / f"{self.split}.json",
                                              captions / f"{self.split}-attention.h5",
                                              manifests.manifest_path(self.input()["annotations"].path, self.split),
                                              java={"auto": None, "yes": True, "no": False}[e.java],
                                              spice=e.spice, examples=e.report_examples,
                                              dataset_roots=context.dataset_image_roots(), about=self.about())
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
