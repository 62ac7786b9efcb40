"""The `luigi` command's start: every problem of its command line and config files found before anything runs,
and luigi's pid lock keyed on the workspace (tasks/__init__.py runs both while luigi imports the package)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import luigi
import luigi.cmdline_parser
import luigi.configuration
import luigi.lock
import luigi.task_register

from pipeline import defaults, extensions, settings_check
from storage import workspace as ws
from tasks import config
from tasks.config import (DEFAULT_CONFIG, Section, comma_list, config_files, config_paths, dataset,
                          section_problems, training, workspace)


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
    if not (root and root not in register.task_names()):   # an unknown task's own flags would only add noise
        command_line += settings_check.check_flags(unknown, flags)
        command_line += settings_check.check_abbreviations([a for a in argv if a not in unknown], _exact_flags(root))
    if not command_line:   # luigi can parse it: check the values as the run will see them, flags applied
        with luigi.cmdline_parser.CmdlineParser.global_instance(argv):
            values = section_problems()
            values += [] if values else truth_problems() + unread_problems(argv)
        luigi.task_register.Register.clear_instance_cache()
        config.sections_checked = not values   # the run sees the same values: complete() need not read them again
        problems += values
    return problems + command_line


def truth_problems() -> list[str]:
    """Settings that need per-image truth — select_by a plug-in's val score, scst_reward a plug-in's reward (which
    uses the truth of the metrics of its name) — on a COCO dataset none of whose annotation files carries that
    truth's key. Found before any work, by a scan of the files' bytes."""
    t = training.read()
    uses = [("select_by", extensions.metrics_for(t.select_by))] if t.select_by != "cider" else []
    if t.scst_epochs > 0 and t.scst_reward != "cider":
        uses.append(("scst_reward", extensions.METRICS.get(t.scst_reward)))
    uses = [(key, metrics) for key, metrics in uses if metrics is not None]
    if not uses or dataset.read().source != "coco":
        return []
    problems = []
    for key, metrics in uses:
        labelled = re.compile(rb'"%s"\s*:' % re.escape(metrics.truth_key.encode()))
        found = False
        for path in comma_list(dataset.read().annotations):
            with open(path, "rb") as f:
                found = found or bool(labelled.search(f.read()))
        if not found:
            problems.append(f"[training] {key} = {getattr(t, key)} needs per-image truth, and no image of [dataset] "
                            f"annotations carries \"{metrics.truth_key}\" (it is never guessed from caption words). "
                            f"Fix: set [training] {key} = cider in {config_files()}.")
    return problems


def unread_problems(argv: list[str]) -> list[str]:
    """Keys set in the user's config file or on the command line that the run would never read: [dataset]
    val_fraction, test_fraction and seed beside a karpathy_split (the split file decides every image's split), so a
    value the user chose is never silently dropped. The project's own config files set them for every run."""
    d = dataset.read()
    if not d.karpathy_split or d.source != "coco":
        return []
    return [f"[dataset] {row['key']} = {row['value']} ({row['source']}) is never read: karpathy_split = "
            f"{d.karpathy_split} decides every image's split. Fix: remove {row['key']}, or empty karpathy_split to "
            "split by fractions."
            for row in settings_check.settings_table(settings_schema(), config_paths(), argv, {})
            if row["section"] == "dataset" and row["key"] in ("val_fraction", "test_fraction", "seed")
            and row["source"] != "default"
            and os.path.abspath(row["source"].removeprefix("file ")) not in config.PROJECT_CONFIGS]


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
        pids = {int(line) for line in Path(pid_file).read_text().split() if line.isdecimal()}
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


def missing_config_file() -> str | None:
    """The problem with a LUIGI_CONFIG_PATH that names no readable file (luigi itself only warns), or None."""
    user = os.environ.get("LUIGI_CONFIG_PATH")
    if not user or os.path.isfile(user) and os.access(user, os.R_OK):
        return None
    why = "is not a file" if os.path.exists(user) else "does not exist"
    return (f"LUIGI_CONFIG_PATH={user}: {why}{' or cannot be read' if os.path.isfile(user) else ''}. Fix: point "
            f"it at your config file (it is layered on {DEFAULT_CONFIG}, so it needs only what you change), or "
            "unset it to run the built-in demo.")


def settings_schema() -> list[tuple[str, str, str, str]]:
    """[(section, key, default as configs/luigi.cfg writes it, help)] of every project section, in class order.
    The defaults are written there only: the sections declare types, choices and meanings."""
    return [(cls.get_task_family(), name, defaults.text(cls.get_task_family(), name), param.description or "")
            for cls in Section.__subclasses__() for name, param in cls.get_params()]
