"""Strict configuration: unknown sections, keys and command-line flags, each named with the nearest valid name.

Luigi only warns about an unknown key of a known section (UnconsumedParameterWarning), says nothing about an
unknown section, and lets argparse reject an unknown flag with a usage dump. A typo then silently trains with
the default. These checks are plain functions over the config files' text and the known names, so tasks.py
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
