"""Shared test fixtures. Tests use configs/test.cfg (a tiny demo) and a temporary workspace per test."""
import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_CONFIG = REPO / "configs" / "test.cfg"
# Set before luigi or tasks is imported anywhere in the test process.
os.environ["LUIGI_CONFIG_PATH"] = str(TEST_CONFIG)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty workspace, selected through $CAPTIONER_WORKDIR."""
    root = tmp_path / "work"
    monkeypatch.setenv("CAPTIONER_WORKDIR", str(root))
    return root


@pytest.fixture(scope="session")
def features_template(tmp_path_factory):
    """A workspace whose features of every split (configs/test.cfg) the real tasks extracted, once per test
    process (tests/workspaces.py): copied by `extracted`, never used in place."""
    root = tmp_path_factory.mktemp("template") / "w"
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(TEST_CONFIG), CAPTIONER_WORKDIR=str(root))
    proc = subprocess.run([sys.executable, "-m", "tests.workspaces"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    return root


@pytest.fixture
def extracted(tmp_path, features_template):
    """A workspace of the test's own whose features are already extracted, for tests of the stages after
    extraction: a copy of `features_template` (a workspace works wherever it is copied), without its run records."""
    return copy_workspace(features_template, tmp_path / "w")


def copy_workspace(template, workdir):
    """`template` copied to `workdir` (new), without its run records."""
    shutil.copytree(template, workdir, symlinks=True, ignore=shutil.ignore_patterns("runs"))
    return workdir


@pytest.fixture
def digits_plugin(monkeypatch):
    """The digits plug-in registered for one test; the extension registries are restored after it."""
    from pipeline import extensions
    for name in ("IMAGE_FIELDS", "METRICS", "REWARDS", "FEATURE_EXTRAS", "_loaded"):
        monkeypatch.setattr(extensions, name, type(getattr(extensions, name))(getattr(extensions, name)))
    extensions.load(["pipeline.digits"])


def run_luigi(task, *args, config=TEST_CONFIG, workdir=None, timeout=600):
    """Run `luigi --module tasks TASK ARGS...` from the repo root as a user would. Returns CompletedProcess
    with .output (stdout + stderr)."""
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(config))
    if workdir is not None:
        env["CAPTIONER_WORKDIR"] = str(workdir)
    luigi_bin = Path(sys.executable).with_name("luigi")
    proc = subprocess.run([str(luigi_bin), "--module", "tasks", task, "--no-lock", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    proc.output = proc.stdout
    return proc


def assert_real_picture(path, min_side: int = 200) -> None:
    """`path` is a PNG that Pillow decodes, at least `min_side` pixels on each side, with visible content (not
    a blank canvas): what a plot test can check without comparing images."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", (path, image.format)
        assert min(image.size) >= min_side, (path, image.size)
        pixels = np.asarray(image.convert("L"), np.float32)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 16, (path, pixels.std())


@contextlib.contextmanager
def captioner_log():
    """The "captioner" log's lines (INFO and up) while the block runs, in a list of strings: read directly, since
    tasks/config.py turns its propagation to the root logger (and pytest's caplog) off."""
    lines, logger = [], logging.getLogger("captioner")
    handler, level = logging.Handler(logging.INFO), logger.level
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
