"""The Luigi wiring of the digits demo's plug-in (pipeline/digits/): its config sections, the stage that writes the
demo dataset (`[dataset] source = demo`) and the stage that pretrains the digits encoder (`[encoder] weights =
digits`). Both register with the extension points of tasks/plugins.py; the library they call is imported only
when they run."""
from __future__ import annotations

from pathlib import Path

import luigi

from pipeline import encoder as encoder_lib
from pipeline.progress import Progress
from storage import manifests
from storage.weights import CELL_HEAD_FILE
from tasks import plugins
from tasks.base import Stage
from tasks.config import Section, encoder, section_values

WEIGHTS_FILE = "inception_v3_digits.weights.h5"   # pipeline.digits.pretrain.WEIGHTS_FILE, without importing it
PROVENANCE = "pretrained on scikit-learn handwritten digits (pipeline/digits/pretrain.py), not ImageNet"


class demo(Section):
    """[demo] the built-in handwritten-digits dataset."""
    train_images = luigi.IntParameter(description="images written for training")
    val_images = luigi.IntParameter(description="images written for validation")
    test_images = luigi.IntParameter(description="images written for testing")
    seed = luigi.IntParameter(description="the same seed writes the same files; it also draws the disjoint train / "
                                          "val / test pools of digit samples (the digits encoder pretrains on the "
                                          "train pool only)")

    def problems(self):
        out = []
        for key in ("train_images", "val_images", "test_images"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        return out


class pretrain(Section):
    """[pretrain] the built-in digits encoder (pipeline/digits/pretrain.py), used when [encoder] weights = digits."""
    steps = luigi.IntParameter(description="training steps on crops (phase 1)")
    batch_size = luigi.IntParameter(description="scene crops per step")
    crop = luigi.IntParameter(description="crop side in px; 75 has one mixed10 cell, 107 has 2x2")
    learning_rate = luigi.FloatParameter(description="Adam peak rate (warm-up, then cosine decay)")
    warmup_steps = luigi.IntParameter(description="linear warm-up of the learning rate, then cosine decay to 0 "
                                                  "(each phase)")
    scene_steps = luigi.IntParameter(description="training steps on whole scenes (phase 2; scene_train_size)")
    scene_batch_size = luigi.IntParameter(description="whole scenes per step")
    scene_train_size = luigi.IntParameter(description="side in px of phase 2's scenes; 0: [encoder] image_size "
                                                      "(batch norms are re-estimated and the report read there)")
    position_weight = luigi.FloatParameter(description="weight of phase 2's second target, each cell's row and column "
                                                       "(so the features say where they lie); 0: none")
    scene_train_from = luigi.ChoiceParameter(choices=["all"] + [f"mixed{i}" for i in range(11)],
                                             description="phase 2 trains this block and those above it; the layers "
                                                         "below keep their phase-1 weights (all: every layer)")
    seed = luigi.IntParameter(description="scenes, crops and initial weights")
    bn_scenes = luigi.IntParameter(description="whole scenes at [encoder] image_size that re-estimate the batch norms")
    val_scenes = luigi.IntParameter(description="held-out val-pool scenes the report's accuracy uses")
    bfloat16 = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                   description="bfloat16 compute (fast on CPUs with AMX / AVX-512 BF16, GPUs)")

    def problems(self):
        out = []
        for key in ("steps", "batch_size", "scene_batch_size", "bn_scenes", "val_scenes"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        for key in ("warmup_steps", "scene_steps", "position_weight"):
            out += self.require(getattr(self, key) >= 0, key, "must be 0 or more")
        out += self.require(self.crop >= 75, "crop", "must be at least 75 (InceptionV3's minimum)")
        out += self.require(self.scene_train_size == 0 or self.scene_train_size >= 75, "scene_train_size",
                            "must be 0 (the encoder's image size) or at least 75 (InceptionV3's minimum)")
        layer = encoder_lib.base_layer(encoder.read().layer)
        out += self.require(self.scene_train_from == "all" or int(self.scene_train_from[5:]) <= int(layer[5:]),
                            "scene_train_from", f"must be all or a block at or below the feature layer {layer}")
        return out + self.require(self.learning_rate > 0, "learning_rate", "must be positive")


class MakeDemoDataset(Stage):
    """The built-in digits dataset in COCO captions format (pipeline/digits/demo.py)."""
    stage = "demo"
    expected_files = (*(f"captions_{s}.json" for s in manifests.SPLITS), "karpathy_split.json")
    version = 2

    def settings(self):
        c = demo.read()
        return {"train_images": c.train_images, "val_images": c.val_images, "test_images": c.test_images,
                "seed": c.seed}

    def run(self):
        from pipeline.digits import demo as demo_lib

        s = self.settings()
        progress = Progress(sum(s[f"{k}_images"] for k in manifests.SPLITS), "demo dataset", "images",
                            self.report_progress)
        with self.atomic_output() as tmp:
            demo_lib.write_demo_dataset(tmp, **s, progress=lambda done, total: progress.update())


class PretrainDigitsEncoder(Stage):
    """InceptionV3 pretrained on scikit-learn digits (the demo's train pool): encoders/<fp>/ with the weights
    file, its per-cell head and report.json (held-out accuracy, steps, seconds)."""
    stage = "encoders"
    version = 4
    expected_files = (WEIGHTS_FILE, CELL_HEAD_FILE, manifests.REPORT_FILE)

    def settings(self):
        # trained, batch-norm re-estimated and checked on scenes of the size the encoder will see, at its layer
        e = encoder.read()
        return {**section_values(pretrain), "pool_seed": demo.read().seed, "scene_size": e.image_size,
                "layer": encoder_lib.base_layer(e.layer)}

    def identity(self) -> dict:
        """The weights identity extraction records (pipeline.encoder.stage_identity)."""
        path = Path(self.output().path) / WEIGHTS_FILE
        return encoder_lib.stage_identity("digits", path, self.fingerprint(), PROVENANCE)

    def run(self):
        from pipeline.digits import pretrain as pretrain_lib

        with self.atomic_output() as tmp:
            report = pretrain_lib.pretrain(tmp, self.settings(), progress_callback=self.report_progress)
            manifests.write_json(tmp / "report.json", report)
        self.counts = {"held_out": report["held_out"], "seconds": report["seconds"]}


plugins.DATASETS["demo"] = MakeDemoDataset
plugins.WEIGHTS["digits"] = PretrainDigitsEncoder
