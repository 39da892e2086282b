"""Atomic file writes, output-folder checks and hashing (torch-free). Every checkpoint and artifact
write goes through here.

A write that fails (full disk, read-only file system, permission, a file where a folder goes) raises
`OutputError` naming the path it could not write, never a bare `OSError` traceback; `OutputError` is
an `OSError` too, with `errno` kept. `check_output_dir` refuses an unusable output folder before any
work; `output_errors` turns a failed write anywhere under an output folder into the same one-line error.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Iterator

from mirage_edge.errors import OutputError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# errnos that say a path cannot be written to (rather than a bug, or an input that is missing)
WRITE_ERRNOS = DISK_FULL_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                                   errno.EEXIST}


def write_failure_reason(exc: OSError) -> str:
    """Why a write failed, in words: "the disk is full (No space left on device)", "Read-only file
    system", "Permission denied", ..."""
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({text})"
    if exc.errno == errno.EFBIG:
        return f"the file is larger than the file system allows ({text})"
    return text


def output_error(exc: OSError, path: str | Path, note: str = "") -> OutputError:
    """`OutputError("cannot write PATH: REASON" + note)` for a failed write of `path`, errno kept."""
    if isinstance(exc, OutputError):
        return OutputError(f"{exc}{note}", exc.errno, exc.filename)
    return OutputError(f"cannot write {path}: {write_failure_reason(exc)}{note}", exc.errno, str(path))


def check_output_dir(out: str | Path, what: str = "--out") -> Path:
    """Fail before any work, in one line naming `out`, when files cannot be written under it.

    Creates `out` (as the command would) and a throw-away file in it: permission bits alone do not
    tell (root ignores them; read-only mounts, immutable folders and full disks refuse anyway).
    Raises `OutputError`: "--out X is a file, not a folder", "--out X/sub cannot be created: X is a
    file, not a folder", "--out X is not writable: Read-only file system" (or: the disk is full ...).
    `what` names the setting in the message. Returns `out` as a Path.
    """
    out = Path(out)
    for p in (out, *out.parents):  # the nearest existing part of the path must be a folder
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                kind = "is a file, not a folder" if p.is_file() else "is not a folder"
                why = kind if p == out else f"cannot be created: {p} {kind}"
                raise OutputError(f"{what} {out} {why}", errno.ENOTDIR, str(p))
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise OutputError(f"{what} {out} is not writable: {write_failure_reason(exc)}", exc.errno,
                          str(out)) from None
    return out


def is_output_failure(exc: OSError, out: str | Path) -> bool:
    """True when `exc` is a failed write of an output under `out`: a full disk (wherever), or a
    write errno (read-only, permission, a file in the way) on a path inside `out`."""
    if isinstance(exc, OutputError) or exc.errno in DISK_FULL_ERRNOS:
        return True
    if exc.errno not in WRITE_ERRNOS or not exc.filename:
        return False
    try:
        Path(os.fsdecode(exc.filename)).resolve().relative_to(Path(out).resolve())
    except (ValueError, TypeError, OSError):
        return False
    return True


@contextlib.contextmanager
def output_errors(out: str | Path, note: str = "") -> Iterator[None]:
    """Turn a failed write under `out` (see `is_output_failure`) into a one-line `OutputError` naming
    the file, `note` appended (e.g. "; RUN is incomplete: ..."). Other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        if not is_output_failure(exc, out):
            raise
        name = os.fsdecode(exc.filename) if exc.filename else out
        raise output_error(exc, name, note) from exc


def _names_another_file(exc: OSError, *ours: Path) -> bool:
    return bool(exc.filename) and Path(os.fsdecode(exc.filename)) not in ours


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    A crash or exception leaves `path` untouched (old content or absent), never half-written. A
    failed write (of the temporary file or the rename) raises `OutputError` naming `path`.
    """
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not mkstemp: its 0600 would survive the rename. Mode 0666 lets the kernel apply the umask,
        # as a plain open() does; O_EXCL still makes the name ours.
        os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise output_error(exc, path) from exc
    try:
        try:
            yield tmp_path
        except OSError as exc:
            if _names_another_file(exc, tmp_path, path):  # e.g. an input the caller read failed
                raise
            raise output_error(exc, path) from exc
        try:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
        except OSError as exc:
            raise output_error(exc, path) from exc
    finally:
        with contextlib.suppress(OSError):  # a read-only file system may refuse this too
            if tmp_path.exists():
                tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
