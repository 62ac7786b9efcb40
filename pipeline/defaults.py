"""The project's defaults, written once: configs/luigi.cfg. The Luigi config sections (tasks/config.py) always
read that file first, and library callers that pass no settings (tests, benchmarks) read it here."""
from __future__ import annotations

import configparser
import functools
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "luigi.cfg"


@functools.lru_cache(maxsize=None)
def _parser() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(DEFAULT_CONFIG, encoding="utf-8")
    return parser


def text(section: str, key: str) -> str | None:
    """A key's default as configs/luigi.cfg writes it, or None when it writes none."""
    return _parser().get(section, key, fallback=None)


def value(text: str):
    """A config value as Python: true/false → bool, an integer, a float, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def section(name: str) -> dict:
    """{key: value} of one section of configs/luigi.cfg."""
    return {key: value(text) for key, text in _parser().items(name)}
