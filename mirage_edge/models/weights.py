"""Resolving official weights: path, ``hf:<dir>``, cache dir, else download (DESIGN.md §3).

Order for a registered name such as ``mirage-large``: a path given explicitly; ``hf:<dir>`` (a
local Hugging Face snapshot folder); ``$MIRAGE_EDGE_HOME`` (default ``~/.cache/mirage-edge``)
holding the release file or a converted/snapshot folder named after the model; else a download
from the official release with progress, SHA-256 check (when known) and an atomic write.
``MIRAGE_EDGE_OFFLINE=1`` forbids downloading. Every failure is a WeightsNotFoundError that
says where to put the file. Torch-free.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from mirage_edge._io import atomic_path
from mirage_edge.errors import WeightsNotFoundError
from mirage_edge.models.config import PRETRAINED_CFGS, PretrainedCfg


def cache_dir() -> Path:
    """``$MIRAGE_EDGE_HOME`` or ``~/.cache/mirage-edge``."""
    return Path(os.environ.get("MIRAGE_EDGE_HOME") or Path.home() / ".cache" / "mirage-edge").expanduser()


def offline() -> bool:
    return os.environ.get("MIRAGE_EDGE_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def candidates(cfg: PretrainedCfg) -> list[Path]:
    """Places in the cache dir where weights for `cfg` are looked for, in order."""
    home = cache_dir()
    out = []
    if cfg.file_name:
        out.append(home / cfg.file_name)
    out.append(home / cfg.name)  # a converted folder (ours) or a HF snapshot folder
    return out


def where_to_put(cfg: PretrainedCfg) -> str:
    places = " or ".join(str(p) for p in candidates(cfg))
    src = f" (official file: {cfg.url})" if cfg.url else ""
    hf = f", or pass hf:<local snapshot of {cfg.hf_hub_id}>" if cfg.hf_hub_id else ""
    return f"put the weights at {places}{src}{hf}, or pass a checkpoint path"


def resolve_weights(spec: str | Path, download: bool = True) -> Path:
    """Turn a path, ``hf:<dir>`` or registered model name into a local checkpoint path."""
    s = str(spec)
    if s.startswith("hf:"):
        folder = Path(s[3:]).expanduser()
        if not (folder / "model.safetensors").is_file():
            raise WeightsNotFoundError(f"{s}: no model.safetensors in {folder} (expected a local Hugging "
                                       "Face snapshot folder with config.json + model.safetensors)")
        return folder
    path = Path(s).expanduser()
    if path.exists():
        return path
    cfg = PRETRAINED_CFGS.get(s)
    if cfg is None:
        released = ", ".join(sorted(k for k, c in PRETRAINED_CFGS.items() if c.url))
        raise WeightsNotFoundError(f"weights {s!r} not found: not a file or folder, and not a model with "
                                   f"released weights ({released})")
    for cand in candidates(cfg):
        if cand.is_file() or (cand.is_dir() and (cand / "model.safetensors").is_file()):
            return cand
    if not cfg.url:
        raise WeightsNotFoundError(f"{cfg.name} has no released weights; {where_to_put(cfg)}")
    if not download or offline():
        why = "downloads are disabled (MIRAGE_EDGE_OFFLINE=1)" if offline() else "download not allowed here"
        raise WeightsNotFoundError(f"weights for {cfg.name} not found locally and {why}; {where_to_put(cfg)}")
    dest = cache_dir() / (cfg.file_name or f"{cfg.name}.pth")
    download_file(cfg.url, dest, cfg.sha256, hint=where_to_put(cfg))
    return dest


def download_file(url: str, dest: str | Path, sha256: str | None = None, timeout: float = 30.0,
                  hint: str = "", progress: bool = True) -> Path:
    """Stream `url` to `dest` atomically, with a progress bar and SHA-256 check (when given).

    Any network error, HTTP error or checksum mismatch raises WeightsNotFoundError (nothing is
    left at `dest`).
    """
    dest = Path(dest)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = _progress(dest.name, total) if progress else None
            with open(tmp, "wb") as fh:
                while chunk := resp.read(1 << 20):
                    fh.write(chunk)
                    digest.update(chunk)
                    if bar:
                        bar.advance(len(chunk))
            if bar:
                bar.close()
            if sha256 and digest.hexdigest() != sha256.lower():
                raise WeightsNotFoundError(f"checksum mismatch for {url}: got sha256 {digest.hexdigest()}, "
                                           f"expected {sha256}; the file was discarded")
    except WeightsNotFoundError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"could not download {url}: {exc}. {hint}".strip()) from None
    return dest


class _progress:
    """Minimal rich progress bar (falls back to silence without rich)."""

    def __init__(self, name: str, total: int | None) -> None:
        try:
            from rich.progress import Progress
        except ImportError:  # pragma: no cover
            self._p = None
            return
        self._p = Progress(transient=True)
        self._p.start()
        self._task = self._p.add_task(f"downloading {name}", total=total)

    def advance(self, n: int) -> None:
        if self._p:
            self._p.advance(self._task, n)

    def close(self) -> None:
        if self._p:
            self._p.stop()
