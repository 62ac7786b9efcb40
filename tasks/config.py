"""Configuration: the config sections (checked when read), the strict startup check, the per-workspace lock."""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import luigi
import luigi.configuration
import luigi.cmdline_parser
import luigi.lock
import luigi.task_register

from pipeline import encoder as encoder_lib, settings_check, vocabulary as vocab_lib
from pipeline.errors import InputError
from storage import workspace as ws

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "luigi.cfg"
DEMO_CONFIG = REPO / "configs" / "demo.cfg"


def _layer_the_defaults() -> None:
    """Put configs/luigi.cfg (the project's defaults: the local scheduler, [retcode], COCO's model) under the file
    LUIGI_CONFIG_PATH names, so that file holds only what it changes; and, when the result says [dataset]
    source = demo, configs/demo.cfg between the two. Runs when this module is imported, which the `luigi`
    command does while it parses its command line, before it reads [core] and [retcode]."""
    # luigi 3.8 keeps the files it reads, in order, in LuigiConfigParser._config_paths (no public accessor);
    # later files override earlier ones
    paths = luigi.configuration.LuigiConfigParser._config_paths
    if str(DEFAULT_CONFIG) in paths:
        return
    user = os.environ.get("LUIGI_CONFIG_PATH")
    paths.insert(paths.index(user) if user in paths else len(paths), str(DEFAULT_CONFIG))
    luigi.configuration.LuigiConfigParser.reload()
    if luigi.configuration.get_config().get("dataset", "source", "demo") == "demo":
        paths.insert(paths.index(str(DEFAULT_CONFIG)) + 1, str(DEMO_CONFIG))
        _reread(paths)


def _reread(paths: list[str]) -> None:
    """Read the config files again from scratch, in order (ConfigParser.read only adds to what it holds)."""
    parser = luigi.configuration.get_config()
    for section in parser.sections():
        parser.remove_section(section)
    luigi.configuration.LuigiConfigParser.reload()


_layer_the_defaults()


def missing_config_file() -> str | None:
    """The problem with a LUIGI_CONFIG_PATH that names no readable file (luigi itself only warns), or None."""
    user = os.environ.get("LUIGI_CONFIG_PATH")
    if not user or os.path.isfile(user) and os.access(user, os.R_OK):
        return None
    why = "is not a file" if os.path.exists(user) else "does not exist"
    return (f"LUIGI_CONFIG_PATH={user}: {why}{' or cannot be read' if os.path.isfile(user) else ''}. Fix: point "
            f"it at your config file (it is layered on {DEFAULT_CONFIG}, so it needs only what you change), or "
            "unset it to run the built-in demo.")

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



# ------------------------------------------------------------------------------------------ configuration

def config_files() -> str:
    """The config files in effect, for error messages."""
    return ", ".join(config_paths()) or "(no config file)"


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
    source = luigi.ChoiceParameter(choices=["demo", "coco"])
    annotations = luigi.Parameter(description="Comma-separated COCO caption files (source=coco)")
    images = luigi.Parameter(description="Comma-separated image roots, same order as annotations")
    karpathy_split = luigi.Parameter(description="Karpathy dataset_coco.json; empty: fractions")
    val_fraction = luigi.FloatParameter()
    test_fraction = luigi.FloatParameter()
    seed = luigi.IntParameter()

    def problems(self):
        out = self.require(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        out += self.require(0 <= self.test_fraction < 1, "test_fraction", "must be in [0, 1)")
        out += self.require(self.val_fraction + self.test_fraction < 1, "test_fraction",
                            "plus val_fraction must be below 1")
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
        return out


class demo(Section):
    """[demo] the built-in handwritten-digits dataset."""
    train_images = luigi.IntParameter()
    val_images = luigi.IntParameter()
    test_images = luigi.IntParameter()
    seed = luigi.IntParameter()

    def problems(self):
        out = []
        for key in ("train_images", "val_images", "test_images"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        return out


class vocabulary(Section):
    """[vocabulary]"""
    min_count = luigi.IntParameter()
    max_size = luigi.IntParameter(description="0: no cap")
    max_length = luigi.IntParameter(description="words per caption, <start>/<end> excluded")
    length_policy = luigi.ChoiceParameter(choices=list(vocab_lib.LENGTH_POLICIES))

    def problems(self):
        return (self.require(self.min_count >= 1, "min_count", "must be at least 1")
                + self.require(self.max_size == 0 or self.max_size > len(vocab_lib.SPECIALS), "max_size",
                               "must be 0 (no cap) or larger than the 4 special tokens")
                + self.require(self.max_length >= 1, "max_length", "must be at least 1"))


class encoder(Section):
    """[encoder] InceptionV3 feature extractor."""
    weights = luigi.Parameter(description="imagenet | digits | path to a weights .h5 | random:<seed>")
    image_size = luigi.IntParameter(description="input side in pixels")
    layer = luigi.ChoiceParameter(choices=list(encoder_lib.LAYERS),
                                  description="features from mixed10 (8x8x2048 at 299 px) or mixed7 (17x17x768); "
                                              "<layer>+cell_scores (weights = digits): plus the 11 per-cell digit "
                                              "scores of the digits encoder's head")
    batch_size = luigi.IntParameter(description="images per forward pass")
    precision = luigi.ChoiceParameter(choices=list(encoder_lib.PRECISIONS),
                                      description="compute precision of the forward pass (features are stored as "
                                                  "float16 whatever it is; part of the store's identity): bfloat16 "
                                                  "on CPUs with AMX / AVX512-BF16 and GPUs from Ampere on, float16 "
                                                  "on older GPUs with tensor cores")
    decode_workers = luigi.IntParameter(description="image decoding threads; 0: one per CPU core")

    def problems(self):
        return (self.require(self.image_size >= 75, "image_size", "must be at least 75 (InceptionV3's minimum)")
                + self.require(not encoder_lib.LAYERS[self.layer].get("cell_scores") or self.weights == "digits",
                               "layer", f"needs weights = digits (the scores come from its pretraining head); use "
                                        f"{encoder_lib.base_layer(self.layer)} with other weights")
                + self.require(self.batch_size >= 1, "batch_size", "must be at least 1")
                + self.require(self.decode_workers >= 0, "decode_workers", "must be 0 (auto) or more"))


class pretrain(Section):
    """[pretrain] the built-in digits encoder (pipeline/pretrain.py), used when [encoder] weights = digits."""
    steps = luigi.IntParameter(description="training steps on crops (phase 1)")
    batch_size = luigi.IntParameter(description="scene crops per step")
    crop = luigi.IntParameter(description="crop side in px; 75 has one mixed10 cell, 107 has 2x2")
    learning_rate = luigi.FloatParameter(description="Adam peak rate (warm-up, then cosine decay)")
    warmup_steps = luigi.IntParameter()
    scene_steps = luigi.IntParameter(description="training steps on whole 299-px scenes (phase 2)")
    scene_batch_size = luigi.IntParameter(description="whole scenes per step")
    scene_train_from = luigi.ChoiceParameter(choices=["all"] + [f"mixed{i}" for i in range(11)],
                                             description="phase 2 trains this block and those above it; the layers "
                                                         "below keep their phase-1 weights (all: every layer)")
    seed = luigi.IntParameter()
    bn_scenes = luigi.IntParameter(description="299-px scenes that re-estimate the batch norms")
    val_scenes = luigi.IntParameter(description="held-out val-pool scenes the report's accuracy uses")
    bfloat16 = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                   description="bfloat16 compute (fast on CPUs with AMX / AVX-512 BF16, GPUs)")

    def problems(self):
        out = []
        for key in ("steps", "batch_size", "scene_batch_size", "bn_scenes", "val_scenes"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        for key in ("warmup_steps", "scene_steps"):
            out += self.require(getattr(self, key) >= 0, key, "must be 0 or more")
        out += self.require(self.crop >= 75, "crop", "must be at least 75 (InceptionV3's minimum)")
        layer = encoder_lib.base_layer(encoder.read().layer)
        out += self.require(self.scene_train_from == "all" or int(self.scene_train_from[5:]) <= int(layer[5:]),
                            "scene_train_from", f"must be all or a block at or below the feature layer {layer}")
        return out + self.require(self.learning_rate > 0, "learning_rate", "must be positive")


class features(Section):
    """[features] the HDF5 shard store."""
    shard_size = luigi.IntParameter(description="images per shard")
    compression = luigi.ChoiceParameter(choices=["none", "gzip", "lzf"])

    def problems(self):
        return self.require(self.shard_size >= 1, "shard_size", "must be at least 1")


class decoder(Section):
    """[decoder] Show-Attend-Tell model sizes (pipeline/model.py)."""
    feature_dim = luigi.IntParameter(description="features projected to this size once per image")
    attention_dim = luigi.IntParameter()
    embed_dim = luigi.IntParameter()
    units = luigi.IntParameter(description="LSTM (or GRU) units")
    dropout = luigi.FloatParameter()
    cell = luigi.ChoiceParameter(choices=["lstm", "gru"])
    positions = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                    description="each cell's row and column added to the projected features (the "
                                                "attention keys and what the context reads); false: none (the "
                                                "paper's)")
    attention_keys = luigi.ChoiceParameter(choices=["features", "cell_scores"],
                                           description="what the attention keys are computed from: the features, "
                                                       "or (features of a +cell_scores layer) the cell scores alone")
    context_scores = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                         description="with attention_keys = cell_scores: the context reads the cell "
                                                     "scores too, not only the other channels")
    location = luigi.IntParameter(description="location-sensitive attention: the previous and the summed "
                                                         "attention, convolved over the grid with a kernel this wide, "
                                                         "steer the next; 0: off")

    def problems(self):
        out = []
        for key in ("feature_dim", "attention_dim", "embed_dim", "units"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        out += self.require(self.location >= 0, "location", "must be 0 (off) or a kernel width, e.g. 9")
        if self.attention_keys == "cell_scores":   # checked here, not after pretraining and extraction
            layer = encoder.read().layer
            out += self.require(encoder_lib.LAYERS[layer].get("cell_scores"), "attention_keys",
                                f"(the demo's digit option) needs features with cell scores, and [encoder] layer "
                                f"= {layer}; set attention_keys = features and context_scores = false, as "
                                f"configs/coco2017.cfg does for any other dataset (or layer = "
                                f"{encoder_lib.base_layer(layer)}+cell_scores with weights = digits)")
        out += self.require(not self.context_scores or self.attention_keys == "cell_scores", "context_scores",
                            "needs attention_keys = cell_scores (the cell scores it reads); set one or the other")
        return out + self.require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


class training(Section):
    """[training] pipeline/train.py."""
    epochs = luigi.IntParameter()
    batch_size = luigi.IntParameter()
    learning_rate = luigi.FloatParameter()
    lr_schedule = luigi.ChoiceParameter(choices=["constant", "cosine", "exponential"])
    lr_decay = luigi.FloatParameter(description="per-epoch factor of the exponential schedule")
    clip_norm = luigi.FloatParameter(description="global gradient norm clip; 0: none")
    attention_lambda = luigi.FloatParameter(description="doubly stochastic attention weight")
    patience = luigi.IntParameter(description="epochs without a better val score before stopping")
    select_by = luigi.ChoiceParameter(choices=["cider", "digits_exact"],
                                      description="the val score that picks the best epoch (digits_exact: "
                                                  "digit datasets; CIDEr-D breaks its ties)")
    bucket_width = luigi.IntParameter(description="batches of pairs whose caption lengths fall in the "
                                                             "same band of this many tokens; 0: any lengths")
    scst_epochs = luigi.IntParameter(description="self-critical epochs after the cross-entropy ones, "
                                                            "from the best of them; 0: none")
    scst_reward = luigi.ChoiceParameter(choices=["cider", "digits"],
                                        description="what a sampled caption earns: CIDEr-D against its references, "
                                                    "or (digit datasets) 1 − its digits' edit distance / length")
    scst_samples = luigi.IntParameter(description="captions sampled per image and step (the baseline "
                                                             "of each is the mean reward of the others)")
    scst_batch_size = luigi.IntParameter(description="images per self-critical step")
    scst_learning_rate = luigi.FloatParameter(description="constant rate of the self-critical epochs")
    checkpoint_every = luigi.IntParameter(description="steps between checkpoints")
    shuffle_buffer = luigi.IntParameter(description="(image, caption) pairs, or grouped images")
    block_rows = luigi.IntParameter(description="rows per contiguous HDF5 read")
    seed = luigi.IntParameter()
    precision = luigi.ChoiceParameter(choices=["float32", "mixed_bfloat16", "mixed_float16"],
                                      description="compute precision of training and validation (weights stay "
                                                  "float32): mixed_bfloat16 on CPUs with AMX / AVX512-BF16 and "
                                                  "GPUs from Ampere on, mixed_float16 (with loss scaling) on "
                                                  "older GPUs with tensor cores")
    jit_compile = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    strategy = luigi.ChoiceParameter(choices=["auto", "default", "mirrored"])
    val_batch_size = luigi.IntParameter()
    cpu_devices = luigi.IntParameter(description="split the CPU into N logical devices (tests)")
    verify_shards = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                        description="read every shard's checksums before training")

    def problems(self):
        out = []
        for key in ("epochs", "batch_size", "patience", "checkpoint_every", "block_rows", "val_batch_size",
                    "cpu_devices"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        out += self.require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be 0 or more")
        out += self.require(self.bucket_width >= 0, "bucket_width", "must be 0 (off) or more")
        out += self.require(self.learning_rate > 0, "learning_rate", "must be positive")
        out += self.require(self.scst_epochs >= 0, "scst_epochs", "must be 0 (off) or more")
        out += self.require(self.scst_samples >= 2, "scst_samples", "must be at least 2 (each sample's baseline is "
                                                                    "the mean reward of the others)")
        out += self.require(self.scst_batch_size >= 1, "scst_batch_size", "must be at least 1")
        out += self.require(self.scst_learning_rate > 0, "scst_learning_rate", "must be positive")
        return out + self.require(self.clip_norm >= 0, "clip_norm", "must be 0 (no clipping) or positive")


class generation(Section):
    """[generation] caption decoding (pipeline/decode.py)."""
    beam_size = luigi.IntParameter(description="1: greedy")
    max_length = luigi.IntParameter(description="words, <end> included")
    length_penalty = luigi.FloatParameter(description="beam score / length^this; 0: none")
    suppress_unk = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    batch_size = luigi.IntParameter()
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
    """Read (and so check) every project section once per process: InputError listing every problem.
    Runs before any work: at import for the luigi command (startup_problems), else at the first completeness
    check."""
    global _sections_checked
    if not _sections_checked:
        problems = section_problems()
        if problems:
            raise InputError("\n  ".join(["configuration problems:", *problems]))
        _sections_checked = True


_sections_checked = False


def section_problems() -> list[str]:
    """Every project section's value problems (bad numbers, ranges, missing dataset paths), all of them."""
    problems = []
    for section in Section.__subclasses__():
        try:
            section.read()
        except InputError as e:
            problems.append(str(e))
    return problems


def startup_problems(argv: list[str]) -> list[str]:
    """Everything wrong with a `luigi --module tasks ...` command line and its config files, found before anything
    runs and reported together: unknown sections and keys in the config files, unknown flags, an unknown task,
    root-task values that do not parse (`--split tset`), each with the nearest valid name
    (pipeline/settings_check.py); and, when luigi can parse the command line, every section's values."""
    missing = missing_config_file()
    if missing:   # checking the flags and values against the defaults alone would only add noise
        return [missing]
    register = luigi.task_register.Register
    schema = {cls.get_task_family(): {name for name, _ in cls.get_params()} for cls in Section.__subclasses__()}
    problems = [p for path in config_paths() for p in
                settings_check.check_config_file(path, schema, set(register.task_names()))]
    known, unknown = _parse_luigi_flags(argv)
    root = known.root_task
    flags = {"--" + (name if without_section else f"{family}_{name}").replace("_", "-")
             for family, without_section, name, _ in register.get_all_params()}
    command_line = []
    if root and root not in register.task_names():
        command_line.append(f"{root}: unknown task{settings_check.nearest(root, register.task_names())}.")
    elif root:
        task = register.get_task_cls(root)
        flags |= {"--" + name.replace("_", "-") for name, _ in task.get_params()}
        for name, param in task.get_params():
            value = getattr(known, name, None)
            if value is not None:
                try:
                    param.parse(value)
                except Exception as e:
                    choices = getattr(param, "_choices", None)
                    rule = f"one of {', '.join(sorted(map(str, choices)))}" if choices else str(e)
                    command_line.append(f"--{name.replace('_', '-')} {value}: {root} needs {rule}"
                                        f"{settings_check.nearest(value, map(str, choices or ()))}.")
    command_line += settings_check.check_flags(unknown, flags)
    command_line += settings_check.check_abbreviations([a for a in argv if a not in unknown], _exact_flags(root))
    if not command_line:   # luigi can parse it: check the values as the run will see them, flags applied
        global _sections_checked
        with luigi.cmdline_parser.CmdlineParser.global_instance(argv):
            values = section_problems()
            values += [] if values else digit_settings_problems()
        luigi.task_register.Register.clear_instance_cache()
        _sections_checked = not values   # the run sees the same values: complete() need not read them again
        problems += values
    return problems + command_line


def digit_settings_problems() -> list[str]:
    """Settings that need digit truth — select_by = digits_exact, scst_reward = digits — on a dataset that
    declares none: the demo does; a COCO-format dataset does when its images carry "digits" labels."""
    t = training.read()
    uses = [key for key, on in (("select_by", t.select_by == "digits_exact"),
                                ("scst_reward", t.scst_epochs > 0 and t.scst_reward == "digits")) if on]
    if not uses or dataset.read().source == "demo":
        return []
    labelled = re.compile(rb'"digits"\s*:')
    for path in comma_list(dataset.read().annotations):
        with open(path, "rb") as f:
            if labelled.search(f.read()):
                return []
    fixes = {"select_by": "select_by = cider", "scst_reward": "scst_reward = cider"}
    return [f"[training] {key} needs a dataset with digit labels, and no image of [dataset] annotations carries "
            f"\"digits\" (digit metrics are never guessed from caption words). Fix: set [training] {fixes[key]} "
            f"in {config_files()}." for key in uses]


def settings_schema() -> list[tuple[str, str, str, str]]:
    """[(section, key, default as configs/luigi.cfg writes it, help)] of every project section, in class order.
    The defaults are written there only: the sections declare types, choices and meanings."""
    import configparser
    defaults = configparser.ConfigParser(interpolation=None)
    defaults.read(DEFAULT_CONFIG, encoding="utf-8")
    return [(cls.get_task_family(), name, defaults.get(cls.get_task_family(), name, fallback=None),
             param.description or "") for cls in Section.__subclasses__() for name, param in cls.get_params()]


def config_paths() -> list[str]:
    # luigi 3.8 keeps the files it reads in LuigiConfigParser._config_paths (no public accessor).
    return [p for p in luigi.configuration.get_config()._config_paths if os.path.isfile(p)]


def _exact_flags(root: str | None) -> set[str]:
    """Every flag luigi's parser accepts for `root` (its own, every task's and config section's), in full."""
    from luigi.cmdline_parser import CmdlineParser
    # luigi 3.8 builds its argparse parser in CmdlineParser._build_parser; argparse keeps the option strings in
    # _option_string_actions (no public accessor)
    return set(CmdlineParser._build_parser(root_task=root)._option_string_actions)


def _parse_luigi_flags(argv):
    # luigi 3.8 builds its argparse parser in CmdlineParser._build_parser (no public accessor); parsing with it
    # is how luigi itself sees the command line.
    from luigi.cmdline_parser import CmdlineParser
    root = CmdlineParser._build_parser().parse_known_args(argv)[0].root_task
    return CmdlineParser._build_parser(root_task=root).parse_known_args(argv)


def lock_on_workspace(argv: list[str]) -> str | None:
    """Put luigi's pid lock (`[core] lock_pid_dir`, unless configured) in <workspace>/.locks/<config>, so it is
    keyed on the workspace, the config files and the command line together: the same command with another
    config (another dataset) runs beside it. Returns why this run must not start — the same command with the
    same config is running on this workspace, with its pid — or None. (Luigi then takes the lock itself.)"""
    import hashlib
    config = luigi.configuration.get_config()
    known, _ = _parse_luigi_flags(argv)
    root = ws.workspace_root(known.workspace_root or workspace.read().root)
    pid_dir = known.core_lock_pid_dir or (config.get("core", "lock_pid_dir") if config.has_option(
        "core", "lock_pid_dir") else None)
    if pid_dir is None:
        configs = hashlib.sha256("\n".join(os.path.abspath(p) for p in config_paths()).encode()).hexdigest()[:12]
        pid_dir = str(root / ".locks" / configs)
        config.set("core", "lock_pid_dir", pid_dir)
    Path(pid_dir).mkdir(parents=True, exist_ok=True)
    if known.core_no_lock:
        return None
    _, command, pid_file = luigi.lock.get_info(pid_dir)
    try:
        pids = {int(line) for line in Path(pid_file).read_text().split() if line.isdigit()}
    except OSError:
        pids = set()
    holders = sorted(pid for pid in pids if pid != os.getpid() and luigi.lock.getpcmd(pid) == command)
    if not holders:
        return None
    return (f"the same command is already running on workspace {root} with config {config_files()}: pid "
            f"{', '.join(map(str, holders))} ({command}; lock {pid_file}). Fix: wait for it, or use another "
            "workspace ([workspace] root or CAPTIONER_WORKDIR).")


def launched_by_luigi_cli() -> bool:
    """Whether this module is being imported by the `luigi` command (or `python -m luigi`) parsing sys.argv."""
    program = Path(sys.argv[0])
    return program.name == "luigi" or (program.name == "__main__.py" and program.parent.name == "luigi")



def section_values(section) -> dict:
    """Every key of a config section, as read (and checked)."""
    values = section.read()
    return {name: getattr(values, name) for name, _ in section.get_params()}


def workspace_root() -> Path:
    return ws.workspace_root(workspace.read().root)
