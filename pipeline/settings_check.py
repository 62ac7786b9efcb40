"""Strict configuration: unknown sections, keys and command-line flags, each named with the nearest valid name.

Luigi only warns about an unknown key of a known section (UnconsumedParameterWarning), says nothing about an
unknown section, and lets argparse reject an unknown flag with a usage dump. A typo then silently trains with
the default. These checks are plain functions over the config files' text and the known names, so tasks/
(the Luigi wiring) supplies the schema and decides what to do with the problems (stop with exit 35).

    schema          {section: {key, ...}} of the project's own sections: every key is checked
    allowed         sections read by someone else (Luigi's own, task families): present is fine, keys unchecked

It also renders the settings for people: `captioner settings` (settings_table: each key's value and where it
comes from) and docs/configuration.md (settings_markdown: each key's default, valid values and meaning).
"""
from __future__ import annotations

import ast
import configparser
import difflib
import inspect
import os
import re
import textwrap
from pathlib import Path

# Sections Luigi (or its contrib modules) read without a Config class being registered when they are read.
LUIGI_SECTIONS = frozenset({
    "core", "worker", "scheduler", "retcode", "resources", "logging", "task_history", "execution_summary",
    "email", "smtp", "sendgrid", "sns", "batch_notifier", "hdfs", "hadoop", "webhdfs", "spark", "hive",
    "pig", "bigquery", "redshift", "postgres", "mysql", "elasticsearch", "kubernetes", "ecs", "batch",
    "lsf", "sge", "pyspark", "s3", "gcs", "azureblob", "dropbox", "datadog", "prometheus", "metrics",
    "cluster", "DEFAULT", "task", "luigi"})


def nearest(name: str, candidates, form: str = "{}") -> str:
    """' (did you mean X?)' for the closest candidate (written as `form`), or '' when nothing is close."""
    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {form.format(match[0])}?)" if match else ""


def check_config_file(path: str | os.PathLike, schema: dict[str, set], allowed) -> list[str]:
    """Problems of one config file: a section nobody reads, or a key its project section does not have."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        return [f"{path}: cannot be read as a config file: {e}. Fix: repair the file."]
    problems = []
    for section in parser.sections():
        if section in schema:
            known = {key.replace("-", "_") for key in schema[section]}
            for key in parser.options(section):
                if key.replace("-", "_") not in known and key not in parser.defaults():
                    problems.append(f"{path}: [{section}] {key}: unknown key{nearest(key, known)}. "
                                    f"Fix: correct or remove it (valid keys: {', '.join(sorted(known))}).")
        elif section not in allowed and section not in LUIGI_SECTIONS:
            problems.append(f"{path}: [{section}]: unknown section{nearest(section, schema, '[{}]')}. "
                            "Fix: correct or remove it.")
    return problems


def check_flags(unknown_args: list[str], valid_flags) -> list[str]:
    """Problems of command-line arguments the parser did not recognise: `--flag` or `--flag=value` tokens,
    each with the nearest valid flag. (Values of unknown flags come as separate tokens and are skipped.)"""
    problems = []
    for arg in unknown_args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            problems.append(f"{flag}: unknown flag{nearest(flag, valid_flags)}. Fix: correct or remove it "
                            "(`luigi --module tasks TASK --help-all` lists every flag).")
    return problems


def check_abbreviations(argv: list[str], exact_flags) -> list[str]:
    """Problems of `--flag` tokens that are not a flag's full name although argparse would accept them as its
    prefix (`--training-epoch 3` runs as `--training-epochs 3`): a silently guessed setting."""
    problems = []
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag != "--" and flag not in exact_flags:
            expansions = sorted(f for f in exact_flags if f.startswith(flag))
            if expansions:
                meant = f" (did you mean {expansions[0]}?)" if len(expansions) == 1 else \
                    f" (it abbreviates {', '.join(expansions[:4])}{', …' if len(expansions) > 4 else ''})"
                problems.append(f"{flag}: not a full flag name{meant}. Fix: write the flag in full.")
    return problems


def settings_table(schema_rows, config_paths, argv: list[str], environment: dict) -> list[dict]:
    """Every project setting with its value and where the value comes from, as Luigi will resolve it:
    a command-line flag (`--section-key value` or `--section-key=value`) over the last config file that sets
    it over the default. schema_rows: [(section, key, default, help)]; config_paths in Luigi's read order;
    environment: {(section, key): (variable, value)} for settings an environment variable fills when they are
    empty (e.g. [workspace] root ← $CAPTIONER_WORKDIR). → [{"section", "key", "value", "default", "source",
    "help"}]."""
    files = {}
    for path in config_paths:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path, encoding="utf-8")
        for section in parser.sections():
            for key in parser.options(section):
                files[(section, key.replace("-", "_"))] = (parser.get(section, key), str(path))
    flag_names = {f"--{section}-{key}".replace("_", "-"): (section, key) for section, key, _, _ in schema_rows}
    flags, tokens = {}, list(argv)
    while tokens:
        token = tokens.pop(0)
        name, has_value, value = token.partition("=")
        if name in flag_names:
            if not has_value:
                value = tokens.pop(0) if tokens else ""
            flags[flag_names[name]] = (value, name)
    rows = []
    for section, key, default, help_text in schema_rows:
        if (section, key) in flags:
            value, source = flags[(section, key)][0], f"flag {flags[(section, key)][1]}"
        elif (section, key) in files:
            value, source = files[(section, key)][0], f"file {files[(section, key)][1]}"
        else:
            value, source = default, "default"
        if value == "" and (section, key) in environment and environment[(section, key)][1]:
            variable, value = environment[(section, key)]
            source = f"environment ${variable}"
        rows.append({"section": section, "key": key, "value": value, "default": default, "source": source,
                     "help": help_text})
    return rows


# ------------------------------------------------------------------------- docs/configuration.md

def _natural(text: str):
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", text)]


def _rules(section_cls) -> dict[str, list[str]]:
    """{key: [rule]}: the fixed-text rules of the section's problems() that say what a value must be
    (`self.require(cond, "key", "must ...")` or "needs ...", also inside `for key in ("a", "b")` loops), read
    from its source."""
    method = section_cls.__dict__.get("problems")
    if method is None:
        return {}
    out, seen = {}, set()

    def collect(node, loop_var=None, loop_keys=()):
        for call in ast.walk(node):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "require"
                    and len(call.args) == 3) or id(call) in seen:
                continue
            seen.add(id(call))
            key, rule = call.args[1], call.args[2]
            if not (isinstance(rule, ast.Constant) and isinstance(rule.value, str)
                    and ("must" in rule.value or rule.value.startswith("needs"))):
                continue
            keys = [key.value] if isinstance(key, ast.Constant) else \
                list(loop_keys) if getattr(key, "id", None) == loop_var else []
            for name in keys:
                out.setdefault(name, []).append(rule.value)

    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    for loop in [n for n in ast.walk(tree) if isinstance(n, ast.For)]:
        if isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Tuple):
            collect(loop, loop.target.id, [e.value for e in loop.iter.elts if isinstance(e, ast.Constant)])
    collect(tree)
    return out


def _valid_values(param) -> str:
    """What a parameter accepts, from its type: its choices, true/false, or integer / number / text."""
    kinds = {cls.__name__ for cls in type(param).__mro__}
    if getattr(param, "VALUES", None):
        return ", ".join(f"`{v}`" for v in param.VALUES)
    if getattr(param, "_choices", None):   # luigi 3.8 keeps a ChoiceParameter's choices in _choices (a set)
        return ", ".join(f"`{v}`" for v in sorted(map(str, param._choices), key=_natural))
    if "BoolParameter" in kinds:
        return "`true`, `false`"
    return "integer" if "IntParameter" in kinds else "number" if "FloatParameter" in kinds else "text"


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and angle brackets outside `code` (<seed> is not an HTML tag)."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _shown(param, value: str) -> str:
    """A value as a config file spells it (booleans in lower case)."""
    return value.lower() if "BoolParameter" in {c.__name__ for c in type(param).__mro__} else value


def settings_markdown(schema_rows, sections: dict, shipped: list[tuple[str, str]], retcodes: dict) -> str:
    """docs/configuration.md: every project key with its default, valid values, the value each shipped config
    runs with where it differs from the default, and its meaning. schema_rows: [(section, key, default, help)]
    (tasks.settings_schema); sections: {name: Section class} (their docstrings, parameters and problems());
    shipped: [(label, [config paths in the order they are layered])]; retcodes: {key: exit code} the pipeline
    applies."""
    files = []
    for label, paths in shipped:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(paths, encoding="utf-8")
        files.append((label, parser))
    lines = _PREAMBLE + ["The last column shows the value each shipped config runs with where it differs from the "
                         "default: " + ", ".join(f"{label} = " + " over ".join(f"`{Path(p).name}`" for p in paths[::-1])
                                                 for label, paths in shipped) + "."]
    section = None
    for name, key, default, help_text in schema_rows:
        cls = sections[name]
        if name != section:
            section, rules = name, _rules(cls)
            lines += _section_header(name, cls)
        param = dict(cls.get_params())[key]
        default = _shown(param, default)
        meaning = re.sub(r"\s*Choices: \{.*\}$", "", help_text) or ""
        valid = "; ".join([_valid_values(param), *rules.get(key, [])])
        lines.append(f"| `{key}` | {f'`{default}`' if default else '(empty)'} | {_cell(valid)} | {_cell(meaning)} "
                     f"| {_cell(_shipped_values(param, name, key, default, files))} |")
    return "\n".join(lines + _luigi_sections(retcodes))


_PREAMBLE = [
    "# Configuration reference",
    "",
    "<!-- Generated by `captioner settings --markdown > docs/configuration.md` from the config sections in",
    "     tasks/config.py; tests/test_docs.py checks that this file is current. Do not edit by hand. -->",
    "",
    "Every key of the pipeline's config sections. A key is set in a Luigi config file (`[section]`, then",
    "`key = value`) or on the command line as `--section-key value` (underscores become hyphens, e.g.",
    "`--training-batch-size 8`); a flag wins over the files. `captioner settings [FLAGS]` shows the value a",
    "run would use and where it comes from. An unknown section, key or flag, or a value outside its valid",
    "values, stops the run before any work (exit 35) with the nearest valid name and the fix.",
    "",
]


def _section_header(name: str, section_cls) -> list[str]:
    """A section's heading, its docstring (file names as code) and the head of its table."""
    about = (section_cls.__doc__ or "").strip().removeprefix(f"[{name}]").strip()
    about = re.sub(r"([\w/]+\.py)", r"`\1`", about)
    about = about[:1].upper() + about[1:] if about[:1].isalpha() else about
    return (["", f"## [{name}]", ""] + ([_cell(about), ""] if about else [])
            + ["| key | default | valid values | meaning | shipped configs |", "|---|---|---|---|---|"])


def _shipped_values(param, section: str, key: str, default: str, files) -> str:
    """'label, label: `value`; ...' for the shipped configs [(label, parser)] whose value of the key is not the
    default (compared as the parameter reads them: 0.001 is 1e-3)."""
    differing = {}
    try:   # the default as the parameter reads it too (0.00005 and 5e-05 are one value)
        default = _shown(param, param.serialize(param.parse(default)))
    except Exception:
        pass
    for label, parser in files:
        if parser.has_option(section, key):
            raw = parser.get(section, key)
            try:
                value = _shown(param, param.serialize(param.parse(raw)))
            except Exception:
                value = raw
            if value != default:
                differing.setdefault(value, []).append(label)
    return "; ".join(f"{', '.join(labels)}: `{value}`" for value, labels in differing.items())


def _luigi_sections(retcodes: dict) -> list[str]:
    return [
        "",
        "## Luigi's own sections",
        "",
        "Luigi reads these itself; the shipped configs set them as follows.",
        "",
        "- `[core]` `local_scheduler = true`: no `luigid` needed; set it to `false` and `default_scheduler_host`",
        "  to use a central scheduler. `log_level = INFO`: Luigi's own log lines (the pipeline's `[captioner]` lines",
        "  are always at INFO).",
        "  `lock_pid_dir` defaults to `<workspace>/.locks/<config>` (one run of a command per workspace and",
        "  config: the same command with another config runs beside it).",
        "- `[resources]` `gpu = 1`: at most one feature-extraction task (ExtractShard, CaptionImages) at a time",
        "  per scheduler; with `luigid`, set it in luigid's own config to the GPUs of the cluster.",
        "- `[retcode]`: the exit codes, applied even when a config file leaves the section out: "
        + ", ".join(f"`{key} = {code}`" for key, code in retcodes.items()) + ".",
        "",
    ]
