"""Strict configuration: unknown sections, keys and command-line flags, each named with the nearest valid name.

Luigi only warns about an unknown key of a known section (UnconsumedParameterWarning), says nothing about an
unknown section, and lets argparse reject an unknown flag with a usage dump. A typo then silently trains with
the default. These checks are plain functions over the config files' text and the known names, so tasks/
(the Luigi wiring) supplies the schema and decides what to do with the problems (stop with exit 35).

    schema          {section: {key, ...}} of the project's own sections: every key is checked
    allowed         sections read by someone else (Luigi's own, task families): present is fine, keys unchecked
"""
from __future__ import annotations

import configparser
import difflib
import os

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
