"""Resolving official weights: a path, ``hf:<dir>``, the cache dir, the Hugging Face hub, the release file.

Order for a registered name such as ``mirage-large`` (DESIGN.md §3):

1. weights placed by hand in ``$MIRAGE_EDGE_HOME`` (default ``~/.cache/mirage-edge``): the release
   file (``MIRAGE-Large.pth``) or a snapshot / converted folder named after the model;
2. the authors' Hugging Face repo (``j-morano/MIRAGE-Large``, `PretrainedCfg.hf_revision`) through
   ``huggingface_hub`` and its cache (``HF_HUB_CACHE`` / ``HF_HOME``), in their layout:
   ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``), loaded as an ``hf:<dir>``;
3. the GitHub release ``.pth``, downloaded into ``$MIRAGE_EDGE_HOME`` when the hub fails.

Offline (``MIRAGE_EDGE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) steps 2-3 only read the hub cache.
Every file is hashed: a SHA-256 we know (`PretrainedCfg`, or the one the hub cache names a blob
after) must match, else `WeightsChecksumError`; the hashes go into `ResolvedWeights.record`, which
the loaders attach to the model as ``mirage_edge_weights`` (the teacher puts it in every run).
A failure is a WeightsNotFoundError that says where to put the file. Torch-free at import.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirage_edge._deps import missing_dependency
from mirage_edge._io import sha256_file
from mirage_edge.errors import (CheckpointError, MissingDependencyError, WeightsChecksumError,
                                WeightsNotFoundError)
from mirage_edge.models.config import PRETRAINED_CFGS, PretrainedCfg

# What `PyTorchModelHubMixin.save_pretrained` writes, newest first; a folder holds one of them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ResolvedWeights:
    """A local checkpoint (file or folder) and the record of what it is.

    record: ``source`` (path | hf-dir | home | hub | release), ``path``, ``sha256`` (file name ->
    SHA-256 of the bytes loaded), ``checked`` (file name -> what the hash was checked against:
    "known" table, "hub" published hash, or "none"), ``file_sha256`` (the weights file), and for
    the hub ``repo`` / ``revision`` / ``commit``, for the release ``url``.
    """

    path: Path
    record: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """``$MIRAGE_EDGE_HOME`` or ``~/.cache/mirage-edge``."""
    return Path(os.environ.get("MIRAGE_EDGE_HOME") or Path.home() / ".cache" / "mirage-edge").expanduser()


def hub_cache_dir() -> Path | None:
    """The Hugging Face cache named by the environment now (None: the library's default).

    Read at call time: ``huggingface_hub`` reads these variables once, when it is imported.
    """
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    return Path(env["HF_HOME"]).expanduser() / "hub" if env.get("HF_HOME") else None


def _offline_vars() -> list[str]:
    names = ("MIRAGE_EDGE_OFFLINE", "HF_HUB_OFFLINE")
    return [v for v in names if os.environ.get(v, "").strip().lower() in _TRUE]


def offline() -> bool:
    """True when ``MIRAGE_EDGE_OFFLINE`` or ``HF_HUB_OFFLINE`` forbids downloads."""
    return bool(_offline_vars())


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


def _weights_in(folder: Path) -> list[Path]:
    return [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]


# --------------------------------------------------------------------------- resolution
def resolve_weights(spec: str | Path, download: bool = True) -> Path:
    """Turn a path, ``hf:<dir>`` or registered model name into a local checkpoint path (see `resolve`)."""
    return resolve(spec, download).path


def resolve(spec: str | Path, download: bool = True) -> ResolvedWeights:
    """Resolve `spec` (module docstring), check every hash we know and record what is loaded.

    `download=False` reads only local files (the hand-placed weights and the hub cache).
    """
    s = str(spec)
    if s.startswith("hf:"):
        folder = Path(s[3:]).expanduser()
        if not _weights_in(folder):
            raise WeightsNotFoundError(f"{s}: no model.safetensors in {folder} (expected a local Hugging "
                                       "Face snapshot folder with config.json + model.safetensors)")
        return _local(folder, "hf-dir")
    path = Path(s).expanduser()
    if path.exists():
        return _local(path, "path")
    cfg = PRETRAINED_CFGS.get(s)
    if cfg is None:
        released = ", ".join(sorted(k for k, c in PRETRAINED_CFGS.items() if c.url or c.hf_hub_id))
        raise WeightsNotFoundError(f"weights {s!r} not found: not a file or folder, and not a model with "
                                   f"released weights ({released})")
    for cand in candidates(cfg):  # placed by hand: always first
        if cand.is_file() or (cand.is_dir() and _weights_in(cand)):
            return _local(cand, "home", cfg)
    if not cfg.url and not cfg.hf_hub_id:
        raise WeightsNotFoundError(f"{cfg.name} has no released weights; {where_to_put(cfg)}")
    local_only = not download or offline()
    tried: list[str] = []
    hub_missing: MissingDependencyError | None = None
    if cfg.hf_hub_id:
        try:
            return _from_hub(cfg, local_only)
        except CheckpointError:
            raise  # a file that is there but wrong (hash, config) is never skipped silently
        except MissingDependencyError as exc:
            hub_missing = exc
            tried.append(f"Hugging Face {cfg.hf_hub_id} not tried: {exc}")
        except Exception as exc:  # noqa: BLE001 - any hub failure (network, auth, not cached) -> fallback
            tried.append(_hub_failure(cfg, exc, local_only))
    if local_only:
        names = _offline_vars()
        why = (f"downloads are disabled ({', '.join(f'{v}=1' for v in names)})" if names
               else "download not allowed here")
        seen = f" ({'; '.join(tried)})" if tried else ""
        raise WeightsNotFoundError(f"weights for {cfg.name} not found locally{seen} and {why}; "
                                   f"{where_to_put(cfg)}")
    if cfg.url:
        try:
            return _from_release(cfg)
        except (WeightsChecksumError, MissingDependencyError):
            raise
        except WeightsNotFoundError as exc:
            tried.append(str(exc))
    msg = f"could not get the weights of {cfg.name}: {'; '.join(tried)}; {where_to_put(cfg)}"
    if hub_missing is not None:
        raise MissingDependencyError(msg)
    raise WeightsNotFoundError(msg)


def _hub_failure(cfg: PretrainedCfg, exc: Exception, local_only: bool) -> str:
    where = f"Hugging Face {cfg.hf_hub_id}@{cfg.hf_revision}"
    if isinstance(exc, FileNotFoundError) or type(exc).__name__ == "LocalEntryNotFoundError":
        # online, huggingface_hub raises this too when the hub cannot be reached and nothing is cached
        cache = hub_cache_dir() or "the default Hugging Face cache"
        return f"{where}: not in {cache}" + ("" if local_only else " and the hub could not be reached")
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{where}: {type(exc).__name__}: {first}"


def _import_hub() -> Any:
    try:
        import huggingface_hub
    except ModuleNotFoundError as exc:
        err = missing_dependency(exc, "official MIRAGE weights from the Hugging Face hub")
        if err is None:
            raise
        raise err from None
    return huggingface_hub


def _from_hub(cfg: PretrainedCfg, local_only: bool) -> ResolvedWeights:
    """config.json + the weights file of `cfg`'s hub repo at its pinned revision (cache or download)."""
    hub = _import_hub()
    from huggingface_hub.utils import EntryNotFoundError

    cache = hub_cache_dir()
    kw = dict(repo_id=cfg.hf_hub_id, revision=cfg.hf_revision, local_files_only=local_only,
              cache_dir=str(cache) if cache else None)
    config = Path(hub.hf_hub_download(filename="config.json", **kw))
    weights: Path | None = None
    for i, name in enumerate(WEIGHT_FILES):
        try:
            weights = Path(hub.hf_hub_download(filename=name, **kw))
            break
        except EntryNotFoundError:  # also LocalEntryNotFoundError: try the older file name
            if i == len(WEIGHT_FILES) - 1:
                raise
    assert weights is not None
    folder = config.parent
    if weights.parent != folder:  # `main` moved between the two downloads
        raise WeightsNotFoundError(f"Hugging Face {cfg.hf_hub_id}@{cfg.hf_revision} changed while "
                                   f"downloading ({folder.name} then {weights.parent.name}); run again")
    files = {"config.json": config, weights.name: weights}
    sums, checked = {}, {}
    for name, p in files.items():
        sums[name], checked[name] = _check(p, f"{cfg.hf_hub_id}@{cfg.hf_revision}/{name}",
                                           cfg.hf_sha256.get(name), hub_blob=True)
    _check_hub_config(config, cfg)
    record = {"source": "hub", "name": cfg.name, "repo": cfg.hf_hub_id, "revision": cfg.hf_revision,
              "commit": folder.name, "path": str(folder), "sha256": sums, "checked": checked,
              "file_sha256": sums[weights.name]}
    return ResolvedWeights(folder, record)


def _check_hub_config(config: Path, cfg: PretrainedCfg) -> None:
    """The snapshot's config.json must describe this model (``"size": "base"`` for mirage-base)."""
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config}: cannot read the hub config.json: {exc}") from None
    want = cfg.name.removeprefix("mirage-")
    if not isinstance(doc, dict) or doc.get("size") != want:
        got = doc.get("size") if isinstance(doc, dict) else doc
        raise CheckpointError(f"{config}: the snapshot of {cfg.hf_hub_id} says size {got!r}, expected "
                              f"{want!r} for {cfg.name}")


def _from_release(cfg: PretrainedCfg) -> ResolvedWeights:
    """Download the release file into the cache dir (torch.hub: progress, temp file, then rename)."""
    assert cfg.url
    dest = cache_dir() / (cfg.file_name or f"{cfg.name}.pth")
    try:
        import torch.hub
    except ModuleNotFoundError as exc:
        err = missing_dependency(exc, f"downloading {cfg.url}")
        if err is None:
            raise
        raise err from None
    from mirage_edge._log import quiet

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # hash_prefix = the whole known hash: a file that fails it is never moved to `dest`
        torch.hub.download_url_to_file(cfg.url, str(dest), hash_prefix=cfg.sha256, progress=not quiet())
    except RuntimeError as exc:
        if "invalid hash value" not in str(exc):
            raise WeightsNotFoundError(f"could not download {cfg.url}: {exc}") from None
        raise WeightsChecksumError(f"{cfg.url}: SHA-256 mismatch ({exc}); the download was discarded") \
            from None
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        raise WeightsNotFoundError(f"could not download {cfg.url}: {exc}") from None
    res = _local(dest, "release", cfg)
    res.record["url"] = cfg.url
    return res


def _local(path: Path, source: str, cfg: PretrainedCfg | None = None) -> ResolvedWeights:
    """Hash (and check, where a hash is known) a local file or snapshot folder."""
    if path.is_dir():
        files = {n: path / n for n in ("config.json", *WEIGHT_FILES) if (path / n).is_file()}
        weights = next((n for n in WEIGHT_FILES if n in files), None)
    else:
        files, weights = {path.name: path}, path.name
    sums, checked = {}, {}
    for name, p in files.items():
        # only the release file has a known hash; a folder named after the model is ours to fill
        known = cfg.sha256 if cfg is not None and p.is_file() and name == cfg.file_name else None
        sums[name], checked[name] = _check(p, name, known, hub_blob=False)
    record: dict[str, Any] = {"source": source, "path": str(path), "sha256": sums, "checked": checked}
    if cfg is not None:
        record["name"] = cfg.name
    if weights is not None:
        record["file_sha256"] = sums[weights]
    return ResolvedWeights(path, record)


def _check(path: Path, what: str, known: str | None, hub_blob: bool) -> tuple[str, str]:
    """(SHA-256 of `path`, what it was checked against); WeightsChecksumError on a mismatch."""
    digest = sha256_file(path)
    checked = "none"
    if known:
        if digest != known.lower():
            raise WeightsChecksumError(f"{path}: SHA-256 mismatch for {what}: got {digest}, expected "
                                       f"{known}; refusing to load it (altered, corrupt or not the official "
                                       "file): delete it and fetch it again")
        checked = "known"
    published = _hub_published_hash(path) if hub_blob else None
    if published is not None:
        kind, want = published
        got = digest if kind == "sha256" else _git_blob_sha1(path)
        if got != want:
            raise WeightsChecksumError(f"{path}: {kind} mismatch for {what}: the Hugging Face cache holds "
                                       f"it as {want} (the hash the hub published) but its content hashes "
                                       f"to {got}; refusing to load it (altered or corrupt): delete it and "
                                       "fetch it again")
        checked = "known" if checked == "known" else "hub"
    return digest, checked


def _hub_published_hash(path: Path) -> tuple[str, str] | None:
    """("sha256" | "git-sha1", hex): the hub cache names each blob after its etag, the LFS sha256
    of large files or the git blob id of small ones; None when `path` is no link to such a blob
    (a copied snapshot, or a cache on a file system without symlinks)."""
    if not path.is_symlink():
        return None
    blob = Path(os.path.realpath(path)).name
    if re.fullmatch(r"[0-9a-f]{64}", blob):
        return "sha256", blob
    if re.fullmatch(r"[0-9a-f]{40}", blob):
        return "git-sha1", blob
    return None


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def find_local(cfg: PretrainedCfg) -> str | None:
    """Where `resolve` would find `cfg`'s weights without any download (nothing hashed), or None."""
    for cand in candidates(cfg):
        if cand.is_file() or (cand.is_dir() and _weights_in(cand)):
            return str(cand)
    if cfg.hf_hub_id:
        try:
            hub = _import_hub()
        except MissingDependencyError:
            return None
        cache = hub_cache_dir()
        for name in WEIGHT_FILES:
            hit = hub.try_to_load_from_cache(cfg.hf_hub_id, name, cache_dir=str(cache) if cache else None,
                                             revision=cfg.hf_revision)
            if isinstance(hit, str):
                return f"{Path(hit).parent} (Hugging Face cache, {cfg.hf_hub_id}@{cfg.hf_revision})"
    return None
