"""Content fingerprints of sample files, and the record that spares re-reading unchanged ones.

A sample's fingerprint is a hash of its source files' bytes; the teacher cache recomputes a sample whose
fingerprint changed. Hashing a million B-scans means reading them all, at every run, so
:class:`FileHashes` keeps each file's hash with its status (size, mtime, ctime, inode) in a small SQLite
table and reuses it while the status is unchanged. Standard library only.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from mirage_edge._log import progress

BATCH = 500  # keys per `IN (...)` lookup (well under SQLite's 32766 host parameters)


def fingerprint_bytes(data: bytes) -> str:
    """Content fingerprint of a sample's source (file bytes or array bytes)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fingerprint_file(path: str | Path) -> str:
    """fingerprint_bytes of the file's bytes, read in blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_status(p: str | Path) -> list[int] | None:
    """[size, mtime_ns, ctime_ns, inode] of a file (following links), None if it cannot be stat-ed."""
    try:
        st = os.stat(p)
    except OSError:
        return None
    # ctime cannot be set back by a user: any write, copy or restore of the file changes it
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def connect_sqlite(path: Path) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit), WAL: readers never wait for the writer."""
    db = sqlite3.connect(path, isolation_level=None, timeout=60.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a power cut may lose the last commits, never corrupts
    return db


def chunks(items: Sequence[Any], n: int = BATCH) -> Iterator[Sequence[Any]]:
    """`items` in slices of `n` (for batched `IN (...)` lookups)."""
    for i in range(0, len(items), n):
        yield items[i:i + n]


class FileHashes:
    """Content hashes of files, reused while a file's status is unchanged, so an unchanged data set is
    not read again at every run.

    A SQLite table ``files``: absolute path -> (size, mtime_ns, ctime_ns, inode, hash).
    :meth:`hashes` stats every file and reuses the stored hash when all four match; otherwise it reads
    the file (:func:`fingerprint_file`) and stores the new record. A user cannot set ctime back, so a
    file rewritten at the same size with its old mtime restored is still re-read. A file whose status
    changed less than `racy_s` seconds before it was hashed is not recorded (a second write within
    the file system's timestamp granularity could leave its status as it was); it is read again next
    time. `path` None, or a store that cannot be opened or written (read-only, corrupt): every file is
    read, as without a record, and the store's problem is printed once.
    """

    def __init__(self, path: str | Path | None, racy_s: float = 2.0) -> None:
        self.path = Path(path) if path is not None else None
        self.racy_s = float(racy_s)

    @staticmethod
    def default_path() -> Path:
        """``$MIRAGE_EDGE_HOME/cache/file-hashes.sqlite`` (beside the default teacher cache)."""
        home = Path(os.environ.get("MIRAGE_EDGE_HOME") or Path.home() / ".cache" / "mirage-edge").expanduser()
        return home / "cache" / "file-hashes.sqlite"

    def _open(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = connect_sqlite(self.path)
            db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                       "mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, hash TEXT NOT NULL)")
            return db
        except (sqlite3.Error, OSError) as exc:
            progress(f"file hash record {self.path} unusable ({exc}); reading every file")
            return None

    def hashes(self, paths: Sequence[str | Path]) -> list[str]:
        """fingerprint_file of each path, in order (see class docstring)."""
        names = [os.path.abspath(p) for p in paths]
        db = self._open()
        known: dict[str, tuple[list[int], str]] = {}
        if db is not None:
            try:
                for part in chunks(sorted(set(names))):
                    q = ("SELECT path, size, mtime_ns, ctime_ns, inode, hash FROM files "
                         f"WHERE path IN ({','.join('?' * len(part))})")
                    known.update((r[0], (list(r[1:5]), r[5])) for r in db.execute(q, part))
            except sqlite3.Error as exc:
                progress(f"file hash record {self.path} unreadable ({exc}); reading every file")
                db.close()
                db = None
        out, new, done = [], [], {}
        for name in names:
            if name in done:
                out.append(done[name])
                continue
            status = file_status(name)
            rec = known.get(name)
            if status is not None and rec is not None and rec[0] == status:
                h = rec[1]
            else:
                h = fingerprint_file(name)
                after = file_status(name)
                settled = after is not None and time.time_ns() - max(after[1], after[2]) > self.racy_s * 1e9
                if after == status and settled:
                    new.append((name, *after, h))
            done[name] = h
            out.append(h)
        if db is not None:
            try:
                if new:
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", new)
                    db.execute("COMMIT")
            except sqlite3.Error as exc:
                progress(f"file hash record {self.path} not written ({exc}); the files are read again next time")
            finally:
                db.close()
        return out


__all__ = ["FileHashes", "fingerprint_bytes", "fingerprint_file", "file_status", "connect_sqlite", "chunks", "BATCH"]
