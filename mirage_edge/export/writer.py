"""Atomic artifact folders: build everything in a hidden staging dir beside the target, then rename.

A crash or a failed validation leaves no half-written artifact: the staging dir is removed and
an existing artifact at the destination stays as it was.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from mirage_edge.artifact import METADATA_FILE, ArtifactMeta, write_meta, write_sha256sums
from mirage_edge.errors import ExportError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder on the same filesystem as `final`; removed on exit."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.staging")
    # Not mkdtemp: its 0700 would become the artifact's mode; mkdir gives 0777 minus the umask.
    tmp.mkdir()
    log.debug("building %s in %s", final, tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finalize(staging: Path, meta: ArtifactMeta) -> None:
    """Write metadata.json and SHA256SUMS (model files + metadata) into `staging`."""
    missing = [f for f in meta.files if not (staging / f).is_file()]
    if missing:
        raise ExportError(f"artifact is missing model file(s) {missing} in {staging}")
    write_meta(staging, meta)
    write_sha256sums(staging, [*meta.files, METADATA_FILE])


def publish(staging: Path, final: Path, overwrite: bool = True) -> Path:
    """Move the finished `staging` folder to `final` (replacing an old artifact if `overwrite`)."""
    old = None
    if final.exists():
        if not overwrite:
            raise ExportError(f"{final} exists; pass overwrite=True (--overwrite) to replace it")
        log.info("replacing the artifact at %s", final)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(staging, final)  # staging is a sibling of final: same filesystem, atomic
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final

