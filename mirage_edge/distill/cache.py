"""Teacher-output cache: teacher features computed once, stored as fp16 memory-mapped numpy shards.

Why: the teacher (ViT-B/L at 512) costs far more than a student step, and its outputs for a given
image never change. Like EdgeSAM's saved embeddings and TinyViT's stored logits, we compute them once
and reuse them across epochs, runs and students.

Key. A cache lives in ``<root>/<digest[:16]>/`` where ``digest`` = SHA-256 of the canonical JSON of
:class:`CacheKey`: the teacher's weights hash, the teacher input modalities, the output names and
shapes, the preprocessing spec, the augmentation config + seed + number of views, and the format
version. A different teacher, preprocessing or augmentation therefore never reads another's files.
Inside, every sample id carries a content fingerprint (hash of its source bytes); a changed file is
recomputed, never served stale.

Validation on open (``TeacherCache.open``): ``manifest.json`` must repeat the exact key and digest,
and every shard must exist with the expected dtype/shape; otherwise the folder is deleted and
rebuilt (the reason is reported in ``cache.status``). Writes: shards are flushed before
``index.json`` / ``manifest.json`` are replaced atomically, so a crash only loses uncommitted rows.

Concurrency: runs that share a cache (two students distilled at once) validate and fill it under
an exclusive lock (``TeacherCache.locked``, POSIX ``flock`` on ``<digest[:16]>.lock``), re-reading
the index inside it; rows, once committed, never move, so readers need no lock.

Layout::

    manifest.json            {"format", "version", "key", "digest", "shard_size", "outputs", "rows"}
    index.json               {sample_id: {"row": r, "fp": fingerprint, "views": [done views]}}
    <output>.<shard>.npy     fp16 array shard_size x *shape (np.lib.format, memory-mapped)

Row of (sample, view) = sample_row * views + view.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mirage_edge._io import atomic_write_text
from mirage_edge.errors import DataError

FORMAT = "mirage-edge-teacher-cache"
VERSION = 1


@dataclass
class CacheKey:
    """Everything that determines the teacher outputs of a sample (see module docstring)."""

    teacher_hash: str
    outputs: dict[str, list[int]]
    modalities: list[str] = field(default_factory=lambda: ["bscan"])
    preprocess: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(default_factory=dict)
    aug_seed: int = 0
    views: int = 1
    dtype: str = "float16"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = {k: [int(x) for x in v] for k, v in sorted(self.outputs.items())}
        d["format_version"] = VERSION
        return d

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_bytes(data: bytes) -> str:
    """Content fingerprint of a sample's source (file bytes or array bytes)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fingerprint_file(path: str | Path) -> str:
    return fingerprint_bytes(Path(path).read_bytes())


class TeacherCache:
    """Memory-mapped fp16 store of teacher outputs for (sample id, view). See module docstring."""

    def __init__(self, root: str | Path, key: CacheKey, shard_size: int = 256) -> None:
        if key.views < 1:
            raise ValueError(f"views must be >= 1, got {key.views}")
        self.key = key
        self.digest = key.digest()
        self.dir = Path(root) / self.digest[:16]
        self.shard_size = int(shard_size)
        self.index: dict[str, dict[str, Any]] = {}
        self.status = "unopened"
        self._maps: dict[tuple[str, int], np.memmap] = {}
        self._dirty = False

    # -- open / validate -----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, log: Callable[[str], None] | None = None) -> Iterator["TeacherCache"]:
        """Hold this cache's inter-process lock: `open()` and the fill go inside it (see module docstring)."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): concurrent runs on one cache are unsupported there
            yield self
            return
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dir.with_name(self.dir.name + ".lock"), "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if log:
                    log(f"teacher cache {self.dir}: waiting for another process that is filling it")
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                self.commit()
                fcntl.flock(fh, fcntl.LOCK_UN)

    def open(self) -> "TeacherCache":
        """Validate an existing cache folder (rebuild it if stale or broken) or start a new one."""
        reason = self._problem() if self.dir.exists() else None
        if self.dir.exists() and reason is None:
            self.index = json.loads((self.dir / "index.json").read_text())
            self.status = "reused"
        else:
            if self.dir.exists():
                shutil.rmtree(self.dir)
                self.status = f"rebuilt ({reason})"
            else:
                self.status = "new"
            self.dir.mkdir(parents=True, exist_ok=True)
            self.index = {}
            self._write_meta()
        return self

    def _problem(self) -> str | None:
        """Why the folder cannot be used as is, or None if it is consistent with this key."""
        man_path, idx_path = self.dir / "manifest.json", self.dir / "index.json"
        if not man_path.is_file() or not idx_path.is_file():
            return "manifest.json or index.json missing (incomplete cache)"
        try:
            man = json.loads(man_path.read_text())
            index = json.loads(idx_path.read_text())
        except json.JSONDecodeError as exc:
            return f"unreadable metadata: {exc}"
        if man.get("format") != FORMAT or man.get("version") != VERSION:
            return f"format {man.get('format')!r} v{man.get('version')} is not {FORMAT!r} v{VERSION}"
        if man.get("digest") != self.digest or man.get("key") != json.loads(json.dumps(self.key.to_dict())):
            diff = sorted(k for k in self.key.to_dict() if (man.get("key") or {}).get(k) != self.key.to_dict()[k])
            return f"key mismatch in {', '.join(diff) or 'digest'} (teacher, preprocessing or augmentation changed)"
        if man.get("shard_size") != self.shard_size:
            return f"shard size {man.get('shard_size')} != {self.shard_size}"
        rows = max((e["row"] + 1 for e in index.values()), default=0) * self.key.views
        for name, shape in self.key.outputs.items():
            for shard in range((rows + self.shard_size - 1) // self.shard_size):
                p = self._shard_path(name, shard)
                if not p.is_file():
                    return f"missing shard {p.name}"
                try:
                    arr = np.load(p, mmap_mode="r")
                except (ValueError, OSError, EOFError) as exc:  # EOFError: empty file
                    return f"corrupt shard {p.name}: {exc}"
                if arr.dtype != np.dtype(self.key.dtype) or tuple(arr.shape) != (self.shard_size, *shape):
                    return f"shard {p.name} has {arr.dtype} {arr.shape}, expected {(self.shard_size, *shape)}"
        return None

    def _write_meta(self) -> None:
        # shards first (flushed), then the index, then the manifest that vouches for both
        for mm in self._maps.values():
            if mm.mode != "r":
                mm.flush()
        atomic_write_text(self.dir / "index.json", json.dumps(self.index))
        rows = (max((e["row"] + 1 for e in self.index.values()), default=0)) * self.key.views
        atomic_write_text(self.dir / "manifest.json", json.dumps({
            "format": FORMAT, "version": VERSION, "key": self.key.to_dict(), "digest": self.digest,
            "shard_size": self.shard_size, "outputs": self.key.outputs, "rows": rows}, indent=1))
        self._dirty = False

    # -- rows --------------------------------------------------------------------------------------
    def _shard_path(self, name: str, shard: int) -> Path:
        return self.dir / f"{name}.{shard:05d}.npy"

    def _map(self, name: str, shard: int, write: bool) -> np.memmap:
        handle = self._maps.get((name, shard))
        if handle is not None and (not write or handle.mode != "r"):
            return handle
        p = self._shard_path(name, shard)
        shape = (self.shard_size, *self.key.outputs[name])
        if not p.exists():
            handle = np.lib.format.open_memmap(p, mode="w+", dtype=np.dtype(self.key.dtype), shape=shape)
        else:
            handle = np.load(p, mmap_mode="r+" if write else "r")
        self._maps[(name, shard)] = handle
        return handle

    def row(self, sample_id: str, view: int) -> int:
        return int(self.index[sample_id]["row"]) * self.key.views + int(view)

    def missing(self, samples: Iterable[tuple[str, str]], views: Sequence[int] | None = None) -> list[tuple[str, int]]:
        """(sample id, view) pairs with no valid entry; `samples` are (sample id, fingerprint).

        New ids get rows; an id whose fingerprint changed loses its stored views (recomputed).
        """
        views = list(range(self.key.views)) if views is None else list(views)
        out = []
        next_row = max((e["row"] + 1 for e in self.index.values()), default=0)
        for sid, fp in samples:
            entry = self.index.get(sid)
            if entry is None:
                entry = self.index[sid] = {"row": next_row, "fp": fp, "views": []}
                next_row += 1
                self._dirty = True
            elif entry["fp"] != fp:
                entry.update(fp=fp, views=[])  # content changed: never serve the old features
                self._dirty = True
            out.extend((sid, v) for v in views if v not in entry["views"])
        return out

    def write(self, sample_id: str, view: int, outputs: Mapping[str, np.ndarray]) -> None:
        """Store one (sample, view)'s outputs (name -> array of the key's shape); commit() to publish."""
        if set(outputs) != set(self.key.outputs):
            raise ValueError(f"outputs {sorted(outputs)} != cache outputs {sorted(self.key.outputs)}")
        r = self.row(sample_id, view)
        for name, arr in outputs.items():
            arr = np.asarray(arr)
            if tuple(arr.shape) != tuple(self.key.outputs[name]):
                raise ValueError(f"output {name!r} has shape {arr.shape}, cache expects {self.key.outputs[name]}")
            self._map(name, r // self.shard_size, write=True)[r % self.shard_size] = arr.astype(self.key.dtype)
        views = self.index[sample_id]["views"]
        if view not in views:
            views.append(int(view))
        self._dirty = True

    def commit(self) -> None:
        if self._dirty:
            self._write_meta()

    def has(self, sample_id: str, view: int, fingerprint: str | None = None) -> bool:
        e = self.index.get(sample_id)
        return e is not None and view in e["views"] and (fingerprint is None or e["fp"] == fingerprint)

    def read(self, sample_id: str, view: int) -> dict[str, np.ndarray]:
        """name -> float32 array for (sample, view); DataError if it was never computed."""
        if not self.has(sample_id, view):
            raise DataError(f"teacher cache {self.dir} has no entry for sample {sample_id!r} view {view}")
        r = self.row(sample_id, view)
        return {n: np.asarray(self._map(n, r // self.shard_size, write=False)[r % self.shard_size], dtype=np.float32)
                for n in self.key.outputs}

    def close(self) -> None:
        self.commit()
        self._maps.clear()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open their own memmaps
        d = dict(self.__dict__)
        d["_maps"] = {}
        return d


__all__ = ["CacheKey", "TeacherCache", "fingerprint_bytes", "fingerprint_file"]
