"""Content keys: what the feature store knows an image by.

An image's key is the sha256 of its file's bytes (64 hex characters), never a dataset's image id: two datasets may
number their images alike, and a file may be replaced under its id. Hashing a COCO-sized dataset reads every
byte once; after that a rerun only stats the files. The cache behind that is one SQLite file per workspace,

    <workspace>/cache/contents.sqlite    table files(path TEXT PRIMARY KEY, size, mtime_ns, sha256)

keyed by the file's absolute path and valid while its size and mtime (nanoseconds) are unchanged. It is a cache,
never a task output: deleting it costs one re-read of the images. Several processes may use it at once (SQLite
locks the file; writers wait up to a minute).

A file that does not exist has the key `missing:<sha256 of its path, 16 hex characters>`, so extraction records it
as skipped ("not found") like any other undecodable image, and the key changes once the file appears.

A split of a million images is identified with ContentCache.keys, a batch of paths at a time: the files are
stat'ed and new ones read by a few threads (the system calls and sha256 run outside Python's lock), and the cache
is asked about the whole batch in a few queries, not once per file.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path

MISSING_PREFIX = "missing:"
_ABSENT = (FileNotFoundError, NotADirectoryError)   # a path that names no file (other errors: try again later)
# paths per SELECT: SQLite takes 32766 parameters since 3.32, 999 before
_QUERY_ROWS = 30000 if sqlite3.sqlite_version_info >= (3, 32) else 900
_THREADS = min(8, os.cpu_count() or 1)


def missing_key(path: str | os.PathLike) -> str:
    return MISSING_PREFIX + hashlib.sha256(os.fspath(path).encode("utf-8")).hexdigest()[:16]


def bytes_sha256(path: str | os.PathLike, size: int = 1 << 20) -> str:
    """sha256 of a file's bytes; `size` (its size when known) is read at once, then blocks of 1 MiB."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        block = os.read(fd, min(size + 1, 1 << 20))
        while block:
            digest.update(block)
            block = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    return digest.hexdigest()


def stat_files(paths: list[str], absent=_ABSENT) -> list[tuple[int, int] | None]:
    """(size, mtime_ns) of each file, following symbolic links, or None where os.stat raises one of `absent`
    (the others propagate). Several threads stat at once (it is a system call, outside Python's lock)."""
    def stat_all(part):
        try:
            return [(s.st_size, s.st_mtime_ns) for s in map(os.stat, part)]
        except absent:   # a file is missing: one at a time
            return [_stat_or_none(p, absent) for p in part]
    return in_threads(stat_all, paths)


def _stat_or_none(path: str, absent) -> tuple[int, int] | None:
    try:
        s = os.stat(path)
    except absent:
        return None
    return s.st_size, s.st_mtime_ns


def in_threads(fn, items: list, threads: int = _THREADS) -> list:
    """fn(part) → one result per item, for a few contiguous parts of `items` in threads; the results in order."""
    if threads < 2 or len(items) < 256:
        return fn(items)
    step = -(-len(items) // threads)
    with ThreadPoolExecutor(threads) as pool:
        return [out for part in pool.map(fn, [items[k:k + step] for k in range(0, len(items), step)]) for out in part]


def key_as_int64(key: str) -> int:
    """A content key as an int64 in [2^62, 2^63): never a COCO id; for files that have no id of their own."""
    return (int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) >> 2) | (1 << 62)


class ContentCache:
    """sha256 of image files, remembered by (absolute path, size, mtime_ns).

        cache = ContentCache(workspace / "cache" / "contents.sqlite")
        key = cache.key(path)            # reads the file only when it is new or changed
        keys = cache.keys(paths)         # the same for many files, in a few queries
        cache.close()                    # commits; also on `with ContentCache(...) as cache:`
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS files "
                         "(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)")
        self.hashed = 0   # files read by this instance (the rest were known)
        self._pending = 0

    def stat_key(self, path: str | os.PathLike) -> tuple[str, int, int] | None:
        """(absolute path, size, mtime_ns) of a file, or None when it does not exist. Other OSErrors (permission
        denied, I/O errors) propagate: the next run tries again."""
        absolute = os.path.abspath(path)
        try:
            s = os.stat(absolute)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return absolute, s.st_size, s.st_mtime_ns

    def key(self, path: str | os.PathLike) -> str:
        """The content key of the file at `path` (see the module docstring)."""
        found = self.stat_key(path)
        if found is None:
            return missing_key(os.path.abspath(path))
        absolute, size, mtime = found
        row = self._db.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (absolute,)).fetchone()
        if row is not None and row[0] == size and row[1] == mtime:
            return row[2]
        try:
            sha = bytes_sha256(absolute)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return missing_key(absolute)
        self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (absolute, size, mtime, sha))
        self.hashed += 1
        self._pending += 1
        if self._pending >= 5000:   # keep a long first hashing run's work if it is killed
            self._db.commit()
            self._pending = 0
        return sha

    def keys(self, paths: list[str]) -> list[str]:
        """The content keys of the files at `paths`, as key() gives them one by one: one stat each, one look-up
        in the cache for every _QUERY_ROWS of them, a read of those new or changed since they were hashed, and
        the new ones stored in one statement. Commits."""
        absolute = [p if p.startswith("/") and "/." not in p and "//" not in p else os.path.abspath(p)
                    for p in map(os.fspath, paths)]   # what os.path.abspath gives, without its cost per path
        found = stat_files(absolute)
        known = self._known([p for p, f in zip(absolute, found) if f is not None])
        out, todo = [], {}   # todo: {path to read: where it is in `out`}
        for path, f in zip(absolute, found):
            row = known.get(path)
            if f is None:
                out.append(missing_key(path))
            elif row is not None and row[0] == f[0] and row[1] == f[1]:
                out.append(row[2])
            else:
                todo.setdefault(path, []).append(len(out))
                out.append(None)
        hashed = in_threads(lambda part: [_sha256_or_none(p, found[todo[p][0]][0]) for p in part], list(todo))
        new = []
        for (path, places), sha in zip(todo.items(), hashed):
            for k in places:
                out[k] = sha or missing_key(path)
            if sha:
                new.append((path, *found[places[0]], sha))
        self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", new)
        self._db.commit()
        self.hashed += len(new)
        return out

    def _known(self, paths: list[str]) -> dict[str, tuple]:
        """{path: (size, mtime_ns, sha256, path)} of the paths the cache holds."""
        out = {}
        for k in range(0, len(paths), _QUERY_ROWS):
            part = paths[k:k + _QUERY_ROWS]
            query = f"SELECT size, mtime_ns, sha256, path FROM files WHERE path IN ({','.join('?' * len(part))})"
            rows = self._db.execute(query, part).fetchall()
            out.update(zip(map(itemgetter(3), rows), rows))
        return out

    def close(self) -> None:
        self._db.commit()
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _sha256_or_none(path: str, size: int) -> str | None:
    """bytes_sha256, or None when the file is gone or is not a file (it has the missing key then)."""
    try:
        return bytes_sha256(path, size)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
