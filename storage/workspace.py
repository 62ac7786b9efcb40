"""Where every artifact lives, how its fingerprint is computed, and how it appears atomically.

Layout (see README, "Inspecting artifacts"):

    <root>/<stage>/<fingerprint>/...

A fingerprint is a short hash of a stage's significant settings and of the fingerprints of everything
upstream of it, so changing a setting moves exactly the artifacts that depend on it to new directories.

Durability. Every output is written under a temporary name and renamed into place (atomic_file, atomic_dir).
Before the rename the new file — or every file and directory of a new stage directory — is fsync'ed, and
after it the parent directory is, so:
  - a crash of the process (kill -9, OOM) leaves either the whole output or none of it (plus a temporary that
    the next run removes);
  - a power cut or kernel crash after the rename returned leaves the whole output, with its content on disk;
    one during the write leaves none of it. (Filesystems that ignore fsync — some network mounts, disks with a
    volatile write cache — can still lose the last outputs; they will then be recomputed, never half-read.)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

FINGERPRINT_LENGTH = 12
TEMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)   # mkstemp/mkdtemp create 0600/0700; finished artifacts get the usual permissions


def workspace_root(configured: str = "") -> Path:
    """The workspace directory: `configured` when non-empty, else $CAPTIONER_WORKDIR, else ./work."""
    root = configured or os.environ.get("CAPTIONER_WORKDIR") or "work"
    return Path(root).expanduser().resolve()


def fingerprint(stage: str, settings: dict, upstream: list[str] = ()) -> str:
    """Short stable hash of `stage`, its `settings` (JSON-serialisable) and its upstream fingerprints.

    Upstream order does not matter; settings key order does not matter."""
    payload = json.dumps({"stage": stage, "settings": settings, "upstream": sorted(upstream)},
                         sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]


_file_hash_cache: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) within the process."""
    stat = os.stat(path)
    key = (os.fspath(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _file_hash_cache[key] = digest.hexdigest()
    return _file_hash_cache[key]


def _temp_prefix(final: Path) -> str:
    """`.tmp-<final name>.<host>-<pid>.`: whoever finds it later can tell whether its writer still lives."""
    return f"{TEMP_PREFIX}{final.name}.{host_name()}-{os.getpid()}."


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete temporaries of `final` left by dead processes of this host (a kill -9, a power cut).
    Temporaries of live processes and of other hosts (shared filesystems) are left alone."""
    removed = []
    host = host_name()
    for tmp in final.parent.glob(f"{TEMP_PREFIX}{final.name}.*"):
        owner = tmp.name[len(f"{TEMP_PREFIX}{final.name}."):].split(".")[0]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdecimal() and not process_alive(int(pid)):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def host_name() -> str:
    return socket.gethostname().replace(".", "_")   # dots separate the parts of a temporary's name


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds.

    The temporary name starts with TEMP_PREFIX so a crash leaves nothing that looks complete; stale
    temporaries of the same file from dead processes are removed first. `suffix` ends the temporary name
    (Keras insists on `.weights.h5`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=suffix, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, replaced: list | None = None):
    """Yield an empty temporary directory beside `final`; rename it to `final` only if the block succeeds.

    Used for stage outputs made of several files: the stage directory appears whole or not at all. With
    `replaced` (a list), a `final` that exists then is set aside first (set_aside; its new path appended), so the
    new directory replaces it; without, an existing `final` is kept (an overlapping run made the same output)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        fsync_tree(tmp)
        if replaced is not None and final.exists():
            try:
                replaced.append(set_aside(final))
            except FileNotFoundError:   # another process set it aside meanwhile
                pass
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)   # an overlapping run finished the same output first: same settings, keep it
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, last: str):
    """Yield an empty temporary directory inside `directory` (created if needed). When the block succeeds, each
    file it holds replaces the file of that name in `directory`, `last` last, each fsync'ed: whoever finds
    `last` finds the others complete. For outputs that share a directory (one split's results beside
    another's)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory / last)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(directory / last), dir=directory))
    try:
        yield tmp
        for name in sorted((p.name for p in tmp.iterdir() if p.name != last), key=str) + [last]:
            fsync_path(tmp / name)
            os.replace(tmp / name, directory / name)
        fsync_path(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def portable(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """How an artifact refers to `path`: relative to the workspace `root` when inside it, so the workspace can
    be copied or mounted elsewhere; absolute otherwise (dataset images, weights files outside)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def resolve(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The inverse of portable(): a relative path lies in the workspace `root` as it is now."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file's or directory's content (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root`, `root` last (a stage directory before its rename)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def output_problem(directory: str | os.PathLike, expected: tuple) -> str | None:
    """Why a finished-looking output directory is not complete — a missing expected file, or a *.json file
    that does not parse — or None. Cheap checks only (HDF5 files are checked by their readers)."""
    for name in expected:
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if name.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError):
                return f"{name} is not valid JSON"
    return None


def set_aside(final: str | os.PathLike) -> Path:
    """Rename an (incomplete) output to `.broken-<name>-<unix time>` beside it (`-<time>-<k>` when one was set aside
    in the same second), so it is neither used nor lost; returns the new path."""
    final = Path(final)
    stamp = f".broken-{final.name}-{int(time.time())}"
    aside, k = final.with_name(stamp), 1
    while os.path.lexists(aside):
        aside, k = final.with_name(f"{stamp}-{k}"), k + 1
    os.rename(final, aside)
    return aside


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Write `obj` as UTF-8 JSON atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.write("\n")


def leftover_temporaries(root: str | os.PathLike) -> list[Path]:
    """Every temporary file or directory under `root` (what a crash leaves behind)."""
    return sorted(p for p in Path(root).rglob(f"{TEMP_PREFIX}*"))


# What a workspace holds at its top (the README's "Inspecting artifacts")
WORKSPACE_FOLDERS = ("demo", "encoders", "annotations", "vocabulary", "features", "models", "checkpoints",
                     "captions", "metrics", "folders")
# Stage folders whose `<fp>` outputs `prunable` may delete. Never: the feature stores' shards and plans (keyed by
# content, shared by every annotation version) and the encoder weights a plug-in's stage made (a store's rows
# came from exactly those weights; made again, they would differ).
PRUNED_STAGES = ("annotations", "vocabulary", "models", "checkpoints", "captions", "metrics")


def in_workspace(path: str | os.PathLike) -> tuple | None:
    """The parts of a path from its workspace's top folder on (("models", "<fp>"), ("features", "<fp>", "splits",
    …)), wherever the workspace lay; None for a path in no workspace folder."""
    parts = Path(path).parts
    top = max((i for i, part in enumerate(parts) if part in WORKSPACE_FOLDERS), default=None)
    return parts[top:] if top is not None else None


def _output_key(path: str | os.PathLike) -> tuple | None:
    """What an output path is: (stage, fingerprint), or ("splits", store, plan) for a split index; None else."""
    parts = in_workspace(path) or ()
    if parts[:1] == ("features",) and parts[2:3] == ("splits",) and len(parts) > 3:
        return "splits", parts[1], parts[3]
    return parts[:2] if parts[:1] and parts[0] in PRUNED_STAGES and len(parts) > 1 else None


def _changed_at(path: Path) -> float:
    """The newest mtime of a path and of everything under it (now, for anything that vanishes meanwhile)."""
    try:
        return max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])
    except FileNotFoundError:   # being written or removed: changed now
        return time.time()


def prunable(root: str | os.PathLike, in_use: list[str], keep_seconds: float, now: float | None = None) -> list[Path]:
    """What a workspace holds that `in_use` (output paths: a config's whole chain, what recent runs used) does
    not name and that nothing changed within `keep_seconds`: stage outputs (PRUNED_STAGES/<fp>; checkpoints go
    with their model), split indexes (features/<store>/splits/<plan>), and set-aside `.broken-*` and `.damaged-*`
    copies. The newest output of a stage none of whose outputs in use exists yet is kept (a caption file changed
    since the last run: every fingerprint is new, and the run that makes them may still fail)."""
    now, root = time.time() if now is None else now, Path(root)
    used = {_output_key(path) for path in in_use}
    old = lambda p: _changed_at(p) < now - keep_seconds
    out = []
    for folder, key in [(root / stage, (stage,)) for stage in PRUNED_STAGES if stage != "checkpoints"] + \
            [(store / "splits", ("splits", store.name)) for store in sorted((root / "features").glob("[!.]*"))]:
        changed = {p: _changed_at(p) for p in folder.glob("[!.]*") if p.is_dir()}
        newest = max(changed, key=changed.get, default=None) if not any((*key, p.name) in used for p in changed) \
            else None
        out += sorted(p for p, at in changed.items() if (*key, p.name) not in used and p != newest
                      and at < now - keep_seconds)
        out += sorted(p for p in folder.glob(".broken-*") if old(p))
    models_kept = {p.name for p in (root / "models").glob("[!.]*")} - {p.name for p in out}   # or training:
    models_kept |= {key[1] for key in used if key and key[0] == "models"}                      # not made yet
    out += sorted(p for p in (root / "checkpoints").glob("[!.]*") if p.name not in models_kept and old(p))
    for store in sorted((root / "features").glob("[!.]*")):
        out += sorted(p for p in store.glob(".damaged-*") if old(p))
    return out
