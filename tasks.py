"""Luigi wiring only: configuration sections, and tasks made of requires / output / run.

    luigi --module tasks TrainDecoder                                 # demo (configs/luigi.cfg)
    luigi --module tasks EvaluateCaptions --split test
    LUIGI_CONFIG_PATH=configs/coco2014.cfg luigi --module tasks TrainDecoder

MakeDemoDataset → ExtractAnnotations → BuildVocabulary ─┐
                                     └→ PlanShards → ExtractShard × n → ExtractFeatures(split) ─┴→ TrainDecoder
TrainDecoder + ExtractFeatures(split) → GenerateCaptions(split) → EvaluateCaptions(split)

Each task's output is `<workspace>/<stage>/<fingerprint>`, where the fingerprint hashes the task's significant
settings and every upstream fingerprint (storage/workspace.py). Each run() calls one pipeline function inside
an atomic directory, so an output directory that exists is complete.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import luigi
import luigi.configuration
import luigi.cmdline_parser
import luigi.lock
import luigi.task_register

from pipeline import annotations, demo as demo_lib, encoder as encoder_lib, features as features_lib
from pipeline import folders as folders_lib
from pipeline import pretrain as pretrain_lib, settings_check, train as train_lib, vocabulary as vocab_lib
from pipeline.errors import InputError
from storage import manifests, runs, shards, workspace as ws

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "luigi.cfg"

# With LUIGI_CONFIG_PATH unset, `luigi --module tasks ...` uses the demo config (local scheduler, retcodes).
# The module is imported while luigi parses the command line, before it reads [core] and [retcode].
if "LUIGI_CONFIG_PATH" not in os.environ:
    luigi.configuration.add_config_path(str(DEFAULT_CONFIG))

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
    return ", ".join(_config_paths()) or "(no config file)"


class Section(luigi.Config):
    """A config section whose values are checked when it is read: a bad value stops the run with a message
    naming the config file, the section, the key and the fix."""

    @classmethod
    def read(cls):
        """The section's values, checked: use `dataset.read()`, not `dataset()`."""
        section = cls.get_task_family()
        for name, param in cls.get_params():
            try:
                param.task_value(section, name)
            except Exception as e:   # luigi's own parse error does not say which key
                kind = type(param).__name__.replace("Parameter", "").lower() or "string"
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


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class workspace(Section):
    """[workspace]"""
    root = luigi.Parameter(default="", description="Workspace directory; empty: $CAPTIONER_WORKDIR or ./work")


class dataset(Section):
    """[dataset] which captions and images, and how they are split."""
    source = luigi.ChoiceParameter(choices=["demo", "coco"], default="demo")
    annotations = luigi.Parameter(default="", description="Comma-separated COCO caption files (source=coco)")
    images = luigi.Parameter(default="", description="Comma-separated image roots, same order as annotations")
    karpathy_split = luigi.Parameter(default="", description="Karpathy dataset_coco.json; empty: fractions")
    val_fraction = luigi.FloatParameter(default=0.05)
    test_fraction = luigi.FloatParameter(default=0.05)
    seed = luigi.IntParameter(default=0)

    def problems(self):
        out = self.require(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        out += self.require(0 <= self.test_fraction < 1, "test_fraction", "must be in [0, 1)")
        out += self.require(self.val_fraction + self.test_fraction < 1, "test_fraction",
                            "plus val_fraction must be below 1")
        if self.source == "coco":
            files, roots = _csv(self.annotations), _csv(self.images)
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
    train_images = luigi.IntParameter(default=800)
    val_images = luigi.IntParameter(default=100)
    test_images = luigi.IntParameter(default=100)
    seed = luigi.IntParameter(default=1797)

    def problems(self):
        out = []
        for key in ("train_images", "val_images", "test_images"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        return out


class vocabulary(Section):
    """[vocabulary]"""
    min_count = luigi.IntParameter(default=5)
    max_size = luigi.IntParameter(default=0, description="0: no cap")
    max_length = luigi.IntParameter(default=20, description="words per caption, <start>/<end> excluded")
    length_policy = luigi.ChoiceParameter(choices=list(vocab_lib.LENGTH_POLICIES), default="truncate")

    def problems(self):
        return (self.require(self.min_count >= 1, "min_count", "must be at least 1")
                + self.require(self.max_size == 0 or self.max_size > len(vocab_lib.SPECIALS), "max_size",
                               "must be 0 (no cap) or larger than the 4 special tokens")
                + self.require(self.max_length >= 1, "max_length", "must be at least 1"))


class encoder(Section):
    """[encoder] InceptionV3 feature extractor."""
    weights = luigi.Parameter(default="imagenet",
                              description="imagenet | digits | path to a weights .h5 | random:<seed>")
    image_size = luigi.IntParameter(default=299, description="input side in pixels; 299 gives 8x8 positions")
    batch_size = luigi.IntParameter(default=32, description="images per forward pass")
    decode_workers = luigi.IntParameter(default=0, description="image decoding threads; 0: one per CPU core")

    def problems(self):
        return (self.require(self.image_size >= 75, "image_size", "must be at least 75 (InceptionV3's minimum)")
                + self.require(self.batch_size >= 1, "batch_size", "must be at least 1")
                + self.require(self.decode_workers >= 0, "decode_workers", "must be 0 (auto) or more"))


class pretrain(Section):
    """[pretrain] the built-in digits encoder (pipeline/pretrain.py), used when [encoder] weights = digits."""
    steps = luigi.IntParameter(default=250, description="training steps on crops (phase 1)")
    batch_size = luigi.IntParameter(default=64, description="scene crops per step")
    crop = luigi.IntParameter(default=75, description="crop side in px; 75 has one mixed10 cell, 107 has 2x2")
    learning_rate = luigi.FloatParameter(default=1e-3, description="Adam peak rate (warm-up, then cosine decay)")
    warmup_steps = luigi.IntParameter(default=20)
    scene_steps = luigi.IntParameter(default=90, description="training steps on whole 299-px scenes (phase 2)")
    scene_batch_size = luigi.IntParameter(default=16, description="whole scenes per step")
    seed = luigi.IntParameter(default=0)
    bn_scenes = luigi.IntParameter(default=128, description="299-px scenes that re-estimate the batch norms")
    val_scenes = luigi.IntParameter(default=128, description="held-out val-pool scenes the report's accuracy uses")
    bfloat16 = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                   description="bfloat16 compute (fast on CPUs with AMX / AVX-512 BF16, GPUs)")

    def problems(self):
        out = []
        for key in ("steps", "batch_size", "scene_batch_size", "bn_scenes", "val_scenes"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        for key in ("warmup_steps", "scene_steps"):
            out += self.require(getattr(self, key) >= 0, key, "must be 0 or more")
        out += self.require(self.crop >= 75, "crop", "must be at least 75 (InceptionV3's minimum)")
        return out + self.require(self.learning_rate > 0, "learning_rate", "must be positive")


class features(Section):
    """[features] the HDF5 shard store."""
    shard_size = luigi.IntParameter(default=1000, description="images per shard")
    compression = luigi.ChoiceParameter(choices=["none", "gzip", "lzf"], default="none")

    def problems(self):
        return self.require(self.shard_size >= 1, "shard_size", "must be at least 1")


class decoder(Section):
    """[decoder] Show-Attend-Tell model sizes (pipeline/model.py)."""
    feature_dim = luigi.IntParameter(default=512, description="features projected to this size once per image")
    attention_dim = luigi.IntParameter(default=512)
    embed_dim = luigi.IntParameter(default=256)
    units = luigi.IntParameter(default=512, description="LSTM (or GRU) units")
    dropout = luigi.FloatParameter(default=0.5)
    cell = luigi.ChoiceParameter(choices=["lstm", "gru"], default="lstm")
    positions = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                    description="add each cell's row and column to its projected features")

    def problems(self):
        out = []
        for key in ("feature_dim", "attention_dim", "embed_dim", "units"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        return out + self.require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


class training(Section):
    """[training] pipeline/train.py."""
    epochs = luigi.IntParameter(default=20)
    batch_size = luigi.IntParameter(default=64)
    learning_rate = luigi.FloatParameter(default=4e-4)
    lr_schedule = luigi.ChoiceParameter(choices=["constant", "cosine", "exponential"], default="constant")
    lr_decay = luigi.FloatParameter(default=0.8, description="per-epoch factor of the exponential schedule")
    clip_norm = luigi.FloatParameter(default=5.0, description="global gradient norm clip; 0: none")
    attention_lambda = luigi.FloatParameter(default=1.0, description="doubly stochastic attention weight")
    patience = luigi.IntParameter(default=5, description="epochs without a better val CIDEr-D before stopping")
    checkpoint_every = luigi.IntParameter(default=500, description="steps between checkpoints")
    shuffle_buffer = luigi.IntParameter(default=1000, description="(image, caption) pairs")
    block_rows = luigi.IntParameter(default=256, description="rows per contiguous HDF5 read")
    seed = luigi.IntParameter(default=0)
    mixed_precision = luigi.BoolParameter(default=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    jit_compile = luigi.BoolParameter(default=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    strategy = luigi.ChoiceParameter(choices=["auto", "default", "mirrored"], default="auto")
    val_batch_size = luigi.IntParameter(default=128)
    cpu_devices = luigi.IntParameter(default=1, description="split the CPU into N logical devices (tests)")
    verify_shards = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                        description="read every shard's checksums before training")

    def problems(self):
        out = []
        for key in ("epochs", "batch_size", "patience", "checkpoint_every", "block_rows", "val_batch_size",
                    "cpu_devices"):
            out += self.require(getattr(self, key) >= 1, key, "must be at least 1")
        out += self.require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be 0 or more")
        out += self.require(self.learning_rate > 0, "learning_rate", "must be positive")
        return out + self.require(self.clip_norm >= 0, "clip_norm", "must be 0 (no clipping) or positive")


class generation(Section):
    """[generation] caption decoding (pipeline/decode.py)."""
    beam_size = luigi.IntParameter(default=3, description="1: greedy")
    max_length = luigi.IntParameter(default=20, description="words, <end> included")
    length_penalty = luigi.FloatParameter(default=1.0, description="beam score / length^this; 0: none")
    suppress_unk = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    batch_size = luigi.IntParameter(default=64)
    model = luigi.Parameter(default="", description="model directory; empty: TrainDecoder's for this config")

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
    spice = luigi.BoolParameter(default=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                description="SPICE needs Java and downloads Stanford CoreNLP models")
    java = luigi.ChoiceParameter(choices=["auto", "yes", "no"], default="auto",
                                 description="auto: use Java when found; no: the Java-free fallback")
    report_examples = luigi.IntParameter(default=12, description="worst, best and random images each in the HTML report")

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
    register = luigi.task_register.Register
    schema = {cls.get_task_family(): {name for name, _ in cls.get_params()} for cls in Section.__subclasses__()}
    problems = [p for path in _config_paths() for p in
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
    if not command_line:   # luigi can parse it: check the values as the run will see them, flags applied
        global _sections_checked
        with luigi.cmdline_parser.CmdlineParser.global_instance(argv):
            values = section_problems()
        luigi.task_register.Register.clear_instance_cache()
        _sections_checked = not values   # the run sees the same values: complete() need not read them again
        problems += values
    return problems + command_line


def settings_schema() -> list[tuple[str, str, str, str]]:
    """[(section, key, default as written in a config file, help)] of every project section, in class order."""
    rows = []
    for cls in Section.__subclasses__():
        for name, param in cls.get_params():
            # luigi 3.8 keeps a parameter's default in Parameter._default (no public accessor)
            default = param._default
            shown = "" if default is luigi.parameter._no_value else param.serialize(default)
            rows.append((cls.get_task_family(), name, shown, param.description or ""))
    return rows


def _config_paths() -> list[str]:
    # luigi 3.8 keeps the files it reads in LuigiConfigParser._config_paths (no public accessor).
    return [p for p in luigi.configuration.get_config()._config_paths if os.path.isfile(p)]


def _parse_luigi_flags(argv):
    # luigi 3.8 builds its argparse parser in CmdlineParser._build_parser (no public accessor); parsing with it
    # is how luigi itself sees the command line.
    from luigi.cmdline_parser import CmdlineParser
    root = CmdlineParser._build_parser().parse_known_args(argv)[0].root_task
    return CmdlineParser._build_parser(root_task=root).parse_known_args(argv)


def lock_on_workspace(argv: list[str]) -> str | None:
    """Put luigi's pid lock (`[core] lock_pid_dir`, unless configured) in <workspace>/.locks, so it is keyed on
    the workspace and the command line together. Returns why this run must not start — the same command is
    running on this workspace, with its pid — or None. (Luigi then takes the lock itself, as always.)"""
    config = luigi.configuration.get_config()
    known, _ = _parse_luigi_flags(argv)
    root = ws.workspace_root(known.workspace_root or workspace.read().root)
    pid_dir = known.core_lock_pid_dir or (config.get("core", "lock_pid_dir") if config.has_option(
        "core", "lock_pid_dir") else None)
    if pid_dir is None:
        pid_dir = str(root / ".locks")
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
    return (f"the same command is already running on workspace {root} (pid "
            f"{', '.join(map(str, holders))}; lock {pid_file}). Fix: wait for it, or use another workspace "
            "([workspace] root or CAPTIONER_WORKDIR).")


def _launched_by_luigi_cli() -> bool:
    """Whether this module is being imported by the `luigi` command (or `python -m luigi`) parsing sys.argv."""
    program = Path(sys.argv[0])
    return program.name == "luigi" or (program.name == "__main__.py" and program.parent.name == "luigi")


# ------------------------------------------------------------------------------------------------- tasks

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
            _remember_failure(self, e)
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
            upstream = {t.stage: t.fingerprint() for t in self.upstream_stages()}
            manifests.write_json(tmp / "provenance.json", {
                "stage": self.stage, "fingerprint": self.fingerprint(), "version": self.version,
                "settings": self.settings(), "upstream": upstream})
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
        return _csv(d.annotations), _csv(d.images), d.karpathy_split

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
    return [str(Path(r).expanduser().resolve()) for r in _csv(dataset.read().images)]


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


def workspace_root() -> Path:
    return ws.workspace_root(workspace.read().root)


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


def section_values(section) -> dict:
    """Every key of a config section, as read (and checked)."""
    values = section.read()
    return {name: getattr(values, name) for name, _ in section.get_params()}


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
        if training.read().verify_shards:   # never train on damaged features: re-extract them first
            indexes = [manifests.read_json(self.input()[s].path) for s in ("train", "val")]
            for name in features_lib.quarantine_damaged(store_dir(), indexes):
                extract_planned_shard(features_lib.plan_of(name), name, self.report_progress)
                stale = features_lib.rows_changed(store_dir(), name, indexes)
                if stale:   # an image decodes differently now: the split indexes must be rebuilt first
                    for split in ("train", "val"):
                        Path(self.input()[split].path).unlink(missing_ok=True)
                    raise InputError(f"re-extracted {name}, but {stale} of its images moved to other rows (an "
                                     "image file changed since). The split indexes were removed. Fix: rerun.")
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
            history = train_lib.train_decoder(tmp, root / "checkpoints" / self.fingerprint(), store_dir(),
                                              train_index, manifests.read_json(self.input()["val"].path),
                                              self.requires()["vocabulary"].input().path,
                                              Path(self.input()["vocabulary"].path) / manifests.VOCAB_FILE,
                                              {**section_values(decoder), **section_values(training),
                                               "decoding": validation_decoding()}, provenance,
                                              progress_callback=self.report_progress)
        self.counts = {"epochs": len(history), "best_val_CIDEr": max((h["val_CIDEr"] for h in history), default=None)}


def validation_decoding() -> dict:
    """The [generation] settings TrainDecoder validates with: the best epoch is the best for GenerateCaptions."""
    g = generation.read()
    return {"beam_size": g.beam_size, "max_length": g.max_length, "length_penalty": g.length_penalty,
            "suppress_unk": g.suppress_unk}


class GenerateCaptions(Stage):
    """Caption a split: captions/<fp>/<split>.json (COCO results format) + <split>-attention.h5."""
    stage = "captions"
    split = luigi.ChoiceParameter(choices=list(manifests.SPLITS), default="test")

    @property
    def expected_files(self):
        return f"{self.split}.json", f"{self.split}-attention.h5"

    def requires(self):
        needs = {"features": ExtractFeatures(split=self.split)}
        if not generation.read().model:
            needs["model"] = TrainDecoder()
        return needs

    def settings(self):
        g = section_values(generation)
        g.pop("batch_size")
        if g["model"]:   # an explicit model directory is identified by its weights
            g["model"] = ws.file_sha256(Path(g["model"]) / "decoder.weights.h5")
        return {**g, "split": self.split}

    def run(self):
        from pipeline import decode
        g = generation.read()
        model_dir = g.model or self.input()["model"].path
        trained_on = manifests.read_json(Path(model_dir) / "features.json")["store"]
        if trained_on != store_dir().name:
            raise InputError(f"[generation] model = {model_dir} was trained on features of encoder {trained_on}, "
                             f"but this config's encoder is {store_dir().name}. Fix: use the [encoder] settings "
                             "the model was trained with, or a model trained on this encoder.")
        index = manifests.read_json(self.input()["features"].path)
        results, ids, tokens, attention = decode.generate(
            model_dir, train_lib.shard_rows(store_dir(), index), g.beam_size, g.max_length, g.length_penalty,
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
        g = section_values(generation)
        g.pop("batch_size")
        if g["model"]:
            g["model"] = ws.file_sha256(Path(g["model"]) / "decoder.weights.h5")
        return {**g, "folder": str(self.folder()), "store": store_dir().name}

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
        model_dir = g.model or self.input()["model"].path
        trained_on = manifests.read_json(Path(model_dir) / "features.json")["store"]
        if trained_on != store_dir().name:
            raise InputError(f"[generation] model = {model_dir} was trained on features of encoder {trained_on}, "
                             f"but this config's encoder is {store_dir().name}. Fix: use the [encoder] settings "
                             "the model was trained with, or a model trained on this encoder.")
        store = store_dir() / "folders"
        plan = f"folder-{self.fingerprint()}"
        extract = lambda path, images: features_lib.extract_shard(
            path, images, encoder_identity(), e.image_size, e.batch_size,
            {"fingerprint": store_dir().name, "split": "folder", "plan": plan},
            None if f.compression == "none" else f.compression, e.decode_workers or None,
            progress_callback=self.report_progress)
        rows = lambda index: decode.caption_rows(model_dir, train_lib.shard_rows(store, index), g.beam_size,
                                                 g.max_length, g.length_penalty, g.suppress_unk, g.batch_size,
                                                 progress_callback=self.report_progress)
        with self.atomic_output() as tmp:
            report = folders_lib.caption_folder(tmp, self.folder(), self.listing(), self.previous_output(), store,
                                                extract, rows, f.shard_size, f"shard-{plan}")
        self.counts = {k: report[k] for k in ("images", "captioned", "extracted", "decoded", "reused_captions")}
        self.counts["skipped"] = len(report["skipped"])


class EvaluateCaptions(Stage):
    """Score a split's captions: metrics/<fp>/<split>.json and <split>-report.html."""
    stage = "metrics"
    split = luigi.ChoiceParameter(choices=list(manifests.SPLITS), default="test")

    @property
    def expected_files(self):
        return f"{self.split}.json", f"{self.split}-report.html"

    def requires(self):
        return {"captions": GenerateCaptions(split=self.split), "annotations": ExtractAnnotations()}

    def settings(self):
        e = evaluation.read()
        return {"split": self.split, "spice": e.spice, "java": e.java}

    def run(self):
        from pipeline import evaluate
        e = evaluation.read()
        captions = Path(self.input()["captions"].path)
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
        return {"model": model, "captions": captions.output().path,
                "encoder": f"InceptionV3 ({identity['weights']}: {weights}), features {store_dir().name}",
                "decoding": f"beam {g.beam_size}, max length {g.max_length}, length penalty {g.length_penalty}, "
                            f"<unk> suppressed: {g.suppress_unk}",
                "config": config_files()}


def len_positions() -> int:
    return encoder_lib.grid_size(encoder.read().image_size) ** 2


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
def _remember_failure(task, exception):
    _failures.append(f"{task.task_family} failed: {exception}")
    record(task, "failed", error=f"{type(exception).__name__}: {exception}")


@atexit.register
def _at_exit():
    """Write the run record, then repeat why we failed after Luigi's summary, where a cron mail shows it."""
    if os.getpid() != _RUN["pid"]:   # a forked worker: the main process reports
        return
    failures = list(_failures)
    try:
        run = {**_RUN, "command": sys.argv, "config": config_files()}
        finished = runs.finish(workspace_root(), run, list(dict.fromkeys(_failures)))
        if finished:   # tasks that failed in forked workers (--workers N) are only known from their events
            failures += [f"{t['family']} failed: {t['error'].split(': ', 1)[-1]}" for t in finished["tasks"]
                         if t["outcome"] == "failed"]
    except Exception as e:
        print(f"captioner: could not write the run record: {e}", file=sys.stderr)
    for line in dict.fromkeys(failures):
        print(f"captioner: ERROR: {line}", file=sys.stderr)
    if finished and not failures and _results_line(finished["tasks"]):
        print(f"captioner: results: {_results_line(finished['tasks'])}", file=sys.stderr)


def _results_line(tasks: list[dict]) -> str:
    """The main artifacts a run made or found complete, for its last line: the model directory, captions,
    metrics and report files (paths relative to the current directory when under it)."""
    shown = lambda path: os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else path
    parts = []
    for t in tasks:
        if t["outcome"] not in ("ran", "complete") or not t["outputs"]:
            continue
        out, split = t["outputs"][0], t["params"].get("split", "")
        if t["family"] == "TrainDecoder":
            parts.append(f"model {shown(out)}")
        elif t["family"] == "GenerateCaptions":
            parts.append(f"{split} captions {shown(Path(out) / f'{split}.json')}")
        elif t["family"] == "CaptionImages":
            parts.append(f"folder captions {shown(Path(out) / 'captions.jsonl')}")
        elif t["family"] == "EvaluateCaptions":
            parts += [f"{split} metrics {shown(Path(out) / f'{split}.json')}",
                      f"{split} report {shown(Path(out) / f'{split}-report.html')}"]
    return " · ".join(parts)


# Strict configuration: checked while luigi imports this module to parse its command line, so a typo'd key,
# section or flag stops the run (exit [retcode] scheduling_error) before luigi's argparse or any task sees it.
# Then luigi's pid lock is keyed on the workspace, so the same command on two workspaces runs freely.
if _launched_by_luigi_cli() and not {"--help", "--help-all"} & set(sys.argv):
    # the unknown keys are reported here, as errors; luigi's own warning about them would only repeat it
    warnings.filterwarnings("ignore", category=luigi.parameter.UnconsumedParameterWarning)
    _problems = startup_problems(sys.argv[1:])
    if _problems:
        for _problem in _problems:
            print(f"captioner: ERROR: {_problem}", file=sys.stderr)
        sys.exit(luigi.configuration.get_config().getint("retcode", "scheduling_error", 35))
    _holder = lock_on_workspace(sys.argv[1:])
    if _holder:
        print(f"captioner: ERROR: {_holder}", file=sys.stderr)
        sys.exit(luigi.configuration.get_config().getint("retcode", "already_running", 10))
