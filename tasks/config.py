"""Configuration: the config files layered, the config sections (checked when read); the startup check: startup.py."""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import luigi
import luigi.configuration

from pipeline import defaults, encoder as encoder_lib, extensions, vocabulary as vocab_lib
from pipeline.errors import InputError
from storage import workspace as ws
from tasks import plugins

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = defaults.DEFAULT_CONFIG
DEMO_CONFIG = REPO / "configs" / "demo.cfg"
PROJECT_CONFIGS = {str(DEFAULT_CONFIG), str(DEMO_CONFIG)}   # read for every run (as layered): a user sets nothing there


def _layer_the_defaults() -> None:
    """Put configs/luigi.cfg (the project's defaults: the local scheduler, [retcode], COCO's model) under the file
    LUIGI_CONFIG_PATH names, so that file holds only what it changes; and, when the result says [dataset]
    source = demo (or `--dataset-source demo` on the command line), configs/demo.cfg between the two. Runs when
    this module is imported, which the `luigi` command does while it parses its command line, before it reads
    [core] and [retcode]."""
    # luigi 3.8 keeps the files it reads, in order (later ones win), in LuigiConfigParser._config_paths (not public)
    paths = luigi.configuration.LuigiConfigParser._config_paths
    if str(DEFAULT_CONFIG) in paths:
        return
    user = os.environ.get("LUIGI_CONFIG_PATH")
    paths.insert(paths.index(user) if user in paths else len(paths), str(DEFAULT_CONFIG))
    luigi.configuration.LuigiConfigParser.reload()
    flag = re.search(r"(?:^| )--dataset-source[= ](\S+)", " ".join(sys.argv))   # a flag decides over the files
    if (flag.group(1) if flag else luigi.configuration.get_config().get("dataset", "source", "demo")) == "demo":
        paths.insert(paths.index(str(DEFAULT_CONFIG)) + 1, str(DEMO_CONFIG))
        _reread(paths)


def _reread(paths: list[str]) -> None:
    """Read the config files again from scratch, in order (ConfigParser.read only adds to what it holds)."""
    parser = luigi.configuration.get_config()
    for section in parser.sections():
        parser.remove_section(section)
    luigi.configuration.LuigiConfigParser.reload()


_layer_the_defaults()


# luigi exits 0 on failures unless [retcode] says otherwise; a config without that section still fails loudly.
RETCODES = {"already_running": 10, "missing_data": 20, "not_run": 25, "task_failed": 30, "scheduling_error": 35,
            "unhandled_exception": 40}
for _key, _code in RETCODES.items():
    if not luigi.configuration.get_config().has_option("retcode", _key):
        luigi.configuration.get_config().set("retcode", _key, str(_code))

log = logging.getLogger("captioner")
if not log.handlers:   # luigi configures only its own loggers; ours reports progress, rates and problems
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s: [captioner] %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def config_files() -> str:
    """The config files a user sets values in (the project's own when there are none), for messages and records."""
    paths = config_paths()
    return ", ".join([p for p in paths if p not in PROJECT_CONFIGS] or paths) or "(no config file)"


class Section(luigi.Config):
    """A config section whose values are checked when it is read: a bad value stops the run with a message
    naming the config file, the section, the key and the fix. Its defaults are configs/luigi.cfg's (always read
    first), written nowhere else."""

    @classmethod
    def read(cls):
        """The section's values, checked: use `dataset.read()`, not `dataset()`."""
        section = cls.get_task_family()
        for name, param in cls.get_params():
            try:
                param.task_value(section, name)
            except Exception as e:   # luigi's own parse error does not say which key
                kind = getattr(param, "kind", type(param).__name__.replace("Parameter", "").lower() or "string")
                raise InputError(f"[{section}] {name}: not a valid {kind} ({e}). Fix: {cls._where(name)}.") from e
        instance = cls()
        problems = instance.problems()
        if problems:
            raise InputError("; ".join(problems))
        return instance

    @classmethod
    def _where(cls, key: str) -> str:
        section = cls.get_task_family()
        return (f"set [{section}] {key} in {config_files()} "
                f"(or --{section}-{key.replace('_', '-')} on the command line)")

    def problems(self) -> list[str]:
        """Range checks; each problem is '[section] key = value rule. Fix: ...'."""
        return []

    def require(self, condition: bool, key: str, rule: str) -> list[str]:
        if condition:
            return []
        return [f"[{self.get_task_family()}] {key} = {getattr(self, key)!r} {rule}. Fix: {self._where(key)}."]


def comma_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class workspace(Section):
    """[workspace]"""
    root = luigi.Parameter(description="Workspace directory; empty: $CAPTIONER_WORKDIR or ./work")


class dataset(Section):
    """[dataset] which captions and images, and how they are split."""
    source = luigi.Parameter(description="coco: COCO-format caption files; or a dataset a plug-in writes (demo)")
    plugins = luigi.Parameter(description="comma-separated plug-in modules (pipeline/extensions.py) whose image "
                                          "fields, metrics, rewards and feature extras this dataset uses (the demo's: "
                                          "configs/demo.cfg)")
    annotations = luigi.Parameter(description="Comma-separated COCO caption files (source=coco)")
    images = luigi.Parameter(description="Comma-separated image roots, same order as annotations")
    karpathy_split = luigi.Parameter(description="Karpathy dataset_coco.json; empty: fractions")
    val_fraction = luigi.FloatParameter(description="share of images in val when there is no Karpathy split file")
    test_fraction = luigi.FloatParameter(description="share of images in test when there is no Karpathy split file")
    seed = luigi.IntParameter(description="seed of that split: an image's split is a hash of (seed, image id), "
                                          "so it never moves")

    def problems(self):
        out = self.require(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        out += self.require(0 <= self.test_fraction < 1, "test_fraction", "must be in [0, 1)")
        out += self.require(self.val_fraction + self.test_fraction < 1, "test_fraction",
                            "plus val_fraction must be below 1")
        sources = ("coco", *plugins.DATASETS)
        out += self.require(self.source in sources, "source", f"must be one of {', '.join(sources)}")
        if self.source == "coco":
            files, roots = comma_list(self.annotations), comma_list(self.images)
            out += self.require(bool(files), "annotations", "is empty but source = coco needs caption files")
            out += self.require(len(files) == len(roots), "images",
                                f"lists {len(roots)} image roots for {len(files)} annotation files; "
                                "give one root per file, same order")
            for path in files:
                out += self.require(os.path.isfile(path), "annotations", f"names {path}, which is not a file")
            for path in roots:
                out += self.require(os.path.isdir(os.path.expanduser(path)), "images",
                                    f"names {path}, which is not a directory")
            if self.karpathy_split:
                out += self.require(os.path.isfile(self.karpathy_split), "karpathy_split", "is not a file")
        for key in ("annotations", "images", "karpathy_split") if self.source != "coco" else ():   # never read
            out += self.require(not getattr(self, key), key, f"is set, but source = {self.source} reads the dataset "
                                "its plug-in writes, not your files; for your files set source = coco")
        return out


class vocabulary(Section):
    """[vocabulary]"""
    min_count = luigi.IntParameter(description="a word needs this many occurrences in the training captions")
    max_size = luigi.IntParameter(description="0: no cap")
    max_length = luigi.IntParameter(description="words per caption, <start>/<end> excluded")
    length_policy = luigi.ChoiceParameter(choices=list(vocab_lib.LENGTH_POLICIES),
                                          description="captions longer than max_length: `truncate` keeps the first "
                                                      "words, `drop` leaves them out of training")

    def problems(self):
        return (self.require(self.min_count >= 1, "min_count", "must be at least 1")
                + self.require(self.max_size == 0 or self.max_size > len(vocab_lib.SPECIALS), "max_size",
                               "must be 0 (no cap) or larger than the 4 special tokens")
                + self.require(self.max_length >= 1, "max_length", "must be at least 1"))


class encoder(Section):
    """[encoder] InceptionV3 feature extractor."""
    weights = luigi.Parameter(description="imagenet | path to a weights .h5 | random:<seed> | weights a plug-in's "
                                          "stage makes (the demo's)")
    image_size = luigi.IntParameter(description="input side in pixels")
    layer = luigi.Parameter(description="features from mixed10 (8x8x2048 at 299 px) or mixed7 (17x17x768); "
                                        "<layer>+<extra>: plus the channels a plug-in's feature extra appends to "
                                        "each cell (the demo's: cell_scores)")
    batch_size = luigi.IntParameter(description="images per forward pass")
    precision = luigi.ChoiceParameter(choices=list(encoder_lib.PRECISIONS),
                                      description="compute precision of the forward pass (features are stored as "
                                                  "float16 whatever it is; part of the store's identity): bfloat16 on "
                                                  "CPUs with AMX / AVX512-BF16 and GPUs from Ampere on, float16 on "
                                                  "older GPUs with tensor cores")
    decode_workers = luigi.IntParameter(description="image decoding threads; 0: one per CPU core")

    def problems(self):
        load_plugins()   # a `+<extra>` layer is a plug-in's
        problem = encoder_lib.layer_problem(self.layer)
        extra = encoder_lib.extra_of(self.layer) if problem is None else None
        return (self.require(self.image_size >= 75, "image_size", "must be at least 75 (InceptionV3's minimum)")
                + self.require(problem is None, "layer", problem or "")
                + self.require(extra is None or self.weights.strip() == extra.weights, "layer",
                               f"needs weights = {extra and extra.weights} (its extra channels come from them); use "
                               f"{encoder_lib.base_layer(self.layer)} with other weights")
                + self.require(self.batch_size >= 1, "batch_size", "must be at least 1")
                + self.require(self.decode_workers >= 0, "decode_workers", "must be 0 (auto) or more"))


class features(Section):
    """[features] the HDF5 shard store."""
    shard_size = luigi.IntParameter(description="images per shard")
    compression = luigi.ChoiceParameter(choices=["none", "gzip", "lzf"],
                                        description="HDF5 compression of shards written from then on (`none` reads "
                                                    "fastest)")

    def problems(self):
        return self.require(self.shard_size >= 1, "shard_size", "must be at least 1")


class decoder(Section):
    """[decoder] Show-Attend-Tell model sizes (pipeline/model.py)."""
    feature_dim = luigi.IntParameter(description="features projected to this size once per image")
    attention_dim = luigi.IntParameter(description="size of the attention keys and query")
    embed_dim = luigi.IntParameter(description="word embedding size (and of the deep output layer)")
    units = luigi.IntParameter(description="LSTM (or GRU) units")
    dropout = luigi.FloatParameter(description="dropout before the output layer")
    cell = luigi.ChoiceParameter(choices=["lstm", "gru"], description="the recurrent cell")
    positions = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                    description="each cell's row and column added to the projected features (the "
                                                "attention keys and what the context reads); false: none (the paper's)")
    attention_keys = luigi.ChoiceParameter(choices=["features", "extras"],
                                           description="what the attention keys are computed from: the features, or "
                                                       "(features of a +<extra> layer) the extra channels alone")
    context_extras = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                         description="with attention_keys = extras: the context reads the extra "
                                                     "channels too, not only the base layer's")
    location = luigi.IntParameter(description="location-sensitive attention: the previous and the summed attention, "
                                              "convolved over the grid with a kernel this wide, steer the next; 0: off")
    query_word = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                     description="the attention query reads the step's input word beside the "
                                                 "state (where to look next depends on what was just named); "
                                                 "false: the state alone (the paper's)")

    def problems(self):
        out = []
        for key in ("feature_dim", "attention_dim", "embed_dim", "units"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        out += self.require(self.location >= 0, "location", "must be 0 (off) or a kernel width, e.g. 9")
        if self.attention_keys == "extras":   # checked here, not after pretraining and extraction
            layer = encoder.read().layer
            out += self.require("+" in layer, "attention_keys", f"needs features with extra channels, and [encoder] "
                                f"layer = {layer}; set attention_keys = features and context_extras = false, as "
                                "configs/coco2017.cfg does (or a layer <layer>+<extra> of a plug-in's)")
        out += self.require(not self.context_extras or self.attention_keys == "extras", "context_extras",
                            "needs attention_keys = extras (the channels it reads); set one or the other")
        return out + self.require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


class training(Section):
    """[training] pipeline/train.py."""
    epochs = luigi.IntParameter(description="cross-entropy epochs (fewer when patience stops it)")
    min_steps = luigi.IntParameter(description="at least this many steps: more epochs for a dataset whose `epochs` "
                                               "hold fewer, and the patience scaled alike; 0: none")
    batch_size = luigi.IntParameter(description="(image, caption) pairs per step")
    learning_rate = luigi.FloatParameter(description="Adam's (peak) learning rate")
    lr_schedule = luigi.ChoiceParameter(choices=["constant", "cosine", "exponential"],
                                        description="`constant`, `cosine` (to 0 over all steps) or `exponential` (× "
                                                    "lr_decay per epoch)")
    lr_decay = luigi.FloatParameter(description="per-epoch factor of the exponential schedule")
    clip_norm = luigi.FloatParameter(description="global gradient norm clip; 0: none")
    attention_lambda = luigi.FloatParameter(description="λ, the weight of the doubly stochastic attention term "
                                                        "(per token) in the loss")
    patience = luigi.IntParameter(description="epochs without a better val score before stopping")
    select_by = luigi.Parameter(description="the val score that picks the best epoch: cider, or a val score of a "
                                            "plug-in's metrics (CIDEr-D breaks its ties)")
    bucket_width = luigi.IntParameter(description="batches of pairs whose caption lengths fall in the "
                                                             "same band of this many tokens; 0: any lengths")
    scst_epochs = luigi.IntParameter(description="self-critical epochs after the cross-entropy ones, "
                                                            "from the best of them; 0: none")
    scst_reward = luigi.Parameter(description="what a sampled caption earns: cider (CIDEr-D against its "
                                              "references), or a plug-in's reward")
    scst_samples = luigi.IntParameter(description="captions sampled per image and step (the baseline "
                                                             "of each is the mean reward of the others)")
    scst_batch_size = luigi.IntParameter(description="images per self-critical step")
    scst_learning_rate = luigi.FloatParameter(description="constant rate of the self-critical epochs")
    checkpoint_every = luigi.IntParameter(description="steps between checkpoints")
    shuffle_buffer = luigi.IntParameter(description="(image, caption) pairs, or grouped images")
    block_rows = luigi.IntParameter(description="rows per contiguous HDF5 read")
    seed = luigi.IntParameter(description="data order and initial weights")
    precision = luigi.ChoiceParameter(choices=["float32", "mixed_bfloat16", "mixed_float16"],
                                      description="compute precision of training and validation (weights stay "
                                                  "float32): mixed_bfloat16 on CPUs with AMX / AVX512-BF16 and GPUs "
                                                  "from Ampere on, mixed_float16 (with loss scaling) on older GPUs "
                                                  "with tensor cores")
    jit_compile = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                      description="XLA-compile the train step (one program per caption length)")
    strategy = luigi.ChoiceParameter(choices=["auto", "default", "mirrored"],
                                     description="`auto`: MirroredStrategy when several GPUs are visible, else one "
                                                 "device; `mirrored`: over all GPUs (or logical CPUs); `default`: one "
                                                 "device")
    val_batch_size = luigi.IntParameter(description="images per decoding batch when validating each epoch")
    cpu_devices = luigi.IntParameter(description="split the CPU into N logical devices (tests)")
    verify_shards = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                        description="read every shard's checksums before training")

    def problems(self):
        out = []
        for key in ("epochs", "batch_size", "patience", "checkpoint_every", "block_rows", "val_batch_size",
                    "cpu_devices"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        out += self.require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be 0 or more")
        out += self.require(self.min_steps >= 0, "min_steps", "must be 0 (none) or more")
        out += self.require(self.bucket_width >= 0, "bucket_width", "must be 0 (off) or more")
        out += self.require(self.learning_rate > 0, "learning_rate", "must be positive")
        out += self.require(self.scst_epochs >= 0, "scst_epochs", "must be 0 (off) or more")
        out += self.require(self.scst_samples >= 2, "scst_samples", "must be at least 2 (each sample's baseline is "
                                                                    "the mean reward of the others)")
        out += self.require(self.scst_batch_size >= 1, "scst_batch_size", "must be at least 1")
        out += self.require(self.scst_learning_rate > 0, "scst_learning_rate", "must be positive")
        load_plugins()   # their val scores and rewards
        scores, rewards = ["cider", *extensions.val_labels()], ["cider", *extensions.REWARDS]
        out += self.require(self.select_by in scores, "select_by", f"must be one of {', '.join(scores)} (the "
                            "plug-ins of [dataset] plugins offer the others)")
        out += self.require(self.scst_reward in rewards, "scst_reward", f"must be one of {', '.join(rewards)} (the "
                            "plug-ins of [dataset] plugins offer the others)")
        return out + self.require(self.clip_norm >= 0, "clip_norm", "must be 0 (no clipping) or positive")


class generation(Section):
    """[generation] caption decoding (pipeline/decode.py); TrainDecoder picks its best epoch decoding so."""
    beam_size = luigi.IntParameter(description="1: greedy")
    max_length = luigi.IntParameter(description="words, <end> included")
    length_penalty = luigi.FloatParameter(description="beam score / length^this; 0: none")
    suppress_unk = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING, description="never emit `<unk>`")
    batch_size = luigi.IntParameter(description="images per decoding batch")
    model = luigi.Parameter(description="model directory; empty: TrainDecoder's for this config")

    def problems(self):
        out = self.require(self.beam_size >= 1, "beam_size", "must be at least 1")
        out += self.require(self.max_length >= 1, "max_length", "must be at least 1")
        out += self.require(self.batch_size >= 1, "batch_size", "must be at least 1")
        if self.model:
            out += self.require(os.path.isfile(os.path.join(self.model, "decoder.weights.h5")), "model",
                                "is not a model directory (no decoder.weights.h5 in it)")
        return out


class evaluation(Section):
    """[evaluation] pipeline/evaluate.py."""
    spice = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                description="SPICE needs Java and downloads Stanford CoreNLP models")
    java = luigi.ChoiceParameter(choices=["auto", "yes", "no"],
                                 description="auto: use Java when found; no: the Java-free fallback")
    report_examples = luigi.IntParameter(description="worst, best and random images each in the HTML report")

    def problems(self):
        return self.require(self.report_examples >= 0, "report_examples", "must be 0 or more")


def check_every_section() -> None:
    """Read (and so check) every project section once per process, before any work (at import for the luigi
    command: startup_problems, else at the first completeness check): InputError listing every problem."""
    global sections_checked
    if not sections_checked:
        problems = section_problems()
        if problems:
            raise InputError("\n  ".join(["configuration problems:", *problems]))
        sections_checked = True


sections_checked = False


def section_problems() -> list[str]:
    """Every project section's value problems (bad numbers, ranges, missing dataset paths), each once."""
    problems = []
    for section in Section.__subclasses__():
        try:
            section.read()
        except InputError as e:
            problems += [str(e)] if str(e) not in problems else []
    return problems


def config_paths() -> list[str]:
    # luigi 3.8 keeps the files it reads in LuigiConfigParser._config_paths (no public accessor).
    return [p for p in luigi.configuration.get_config()._config_paths if os.path.isfile(p)]


def load_plugins() -> list[str]:
    """The plug-ins `[dataset] plugins` names, imported and registered (tasks/plugins.py)."""
    return plugins.load(comma_list(dataset.read().plugins), config_files())


def section_values(section) -> dict:
    """Every key of a config section, as read (and checked)."""
    values = section.read()
    return {name: getattr(values, name) for name, _ in section.get_params()}


def workspace_root() -> Path:
    return ws.workspace_root(workspace.read().root)
