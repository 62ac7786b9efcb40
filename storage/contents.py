"""Content keys: what the feature store knows an image by.

An image's key is the sha256 of its file's bytes (64 hex digits), never a dataset's image id: two datasets may
number their images alike, and a file may be replaced under its id. Hashing a COCO-sized dataset reads every
byte once; after that a rerun only stats the files. The cache behind that is one SQLite file per workspace,

    <workspace>/cache/contents.sqlite    table files(path TEXT PRIMARY KEY, size, mtime_ns, sha256)

keyed by the file's absolute path and valid while its size and mtime (nanoseconds) are unchanged. It is a cache,
never a task output: deleting it costs one re-read of the images. Several processes may use it at once (SQLite
locks the file; writers wait up to a minute).

A file that does not exist has the key `missing:<sha256 of its path, 16 hex digits>`, so extraction records it
as skipped ("not found") like any other undecodable image, and the key changes once the file appears.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

MISSING_PREFIX = "missing:"


def missing_key(path: str | os.PathLike) -> str:
    return MISSING_PREFIX + hashlib.sha256(os.fspath(path).encode("utf-8")).hexdigest()[:16]


def bytes_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key_as_int64(key: str) -> int:
    """A content key as an int64 in [2^62, 2^63): never a COCO id; for files that have no id of their own."""
    return (int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) >> 2) | (1 << 62)


class ContentCache:
    """sha256 of image files, remembered by (absolute path, size, mtime_ns).

        cache = ContentCache(workspace / "cache" / "contents.sqlite")
        key = cache.key(path)            # reads the file only when it is new or changed
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

    def close(self) -> None:
        self._db.commit()
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
