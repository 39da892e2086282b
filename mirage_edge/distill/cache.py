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

Content checksums. Every committed (sample, view) row carries a checksum of its bytes in all
outputs (``sums`` in the index), so a shard altered in place (same size, same header) is never
served. Checking costs a read of the shard, so it is done when it can matter, not for the whole
cache at every start: ``open`` re-hashes only the shards whose file status (size, mtime, ctime,
inode: recorded in the manifest at each commit) changed or that a reader flagged, and drops the
rows that fail, which the fill then recomputes; ``read`` hashes each shard once per process the
first time it serves from it (this also catches changes that keep the file status, such as bit
rot), refuses a failing row with a DataError, and flags the shard (``shard.<n>.altered``) so the
next ``open`` recomputes it. An entry without a checksum (a cache of an older version) is recomputed.

Concurrency: runs that share a cache (two students distilled at once) validate and fill it under
an exclusive lock (``TeacherCache.locked``, POSIX ``flock`` on ``<digest[:16]>.lock``), re-reading
the index inside it; rows, once committed, never move, so readers need no lock.

Layout::

    manifest.json            {"format", "version", "key", "digest", "shard_size", "outputs", "rows",
                              "shards": {file: [size, mtime_ns, ctime_ns, inode] when last checked/written}}
    index.json               {sample_id: {"row": r, "fp": fingerprint, "views": [done views],
                                          "sums": {view: checksum of the row in every output}}}
    <output>.<shard>.npy     fp16 array shard_size x *shape (np.lib.format, memory-mapped)
    shard.<shard>.altered    a reader found a row of this shard that fails its checksum

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
from mirage_edge._log import progress
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
        self._stats: dict[str, list[int]] = {}  # shard file -> status when its rows were last checked/written
        self._verified: set[int] = set()  # shards whose committed rows this process has checked
        self._bad_rows: set[int] = set()  # rows that failed their checksum here: never served
        self._flags_cleared: set[Path] = set()  # `.altered` flags handled by open(), removed at commit
        self._by_shard: dict[int, list[tuple[str, int, int]]] | None = None  # shard -> (id, view, row)

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
        self._by_shard, self._verified, self._bad_rows = None, set(), set()
        if self.dir.exists() and reason is None:
            self.index = json.loads((self.dir / "index.json").read_text())
            self._stats = dict(json.loads((self.dir / "manifest.json").read_text()).get("shards") or {})
            self.status = "reused"
            self._recheck_changed_shards()
        else:
            if self.dir.exists():
                shutil.rmtree(self.dir)
                self.status = f"rebuilt ({reason})"
            else:
                self.status = "new"
            self.dir.mkdir(parents=True, exist_ok=True)
            self.index = {}
            self._stats = {}
            self._write_meta()
        return self

    # -- content checksums -------------------------------------------------------------------------
    def _flag(self, shard: int) -> Path:
        return self.dir / f"shard.{shard:05d}.altered"

    def _shard_files(self, shard: int) -> list[Path]:
        return [self._shard_path(name, shard) for name in sorted(self.key.outputs)]

    @staticmethod
    def _file_status(p: Path) -> list[int] | None:
        try:
            st = p.stat()
        except OSError:
            return None
        # ctime cannot be set back by a user: any write, copy or restore of the file changes it
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def _record_status(self, shard: int) -> None:
        for p in self._shard_files(shard):
            status = self._file_status(p)
            if status is not None:
                self._stats[p.name] = status

    def _row_sum(self, r: int) -> str:
        """Checksum of row `r` as stored: its bytes in every output, in name order."""
        h = hashlib.blake2b(digest_size=16)
        shard, i = divmod(r, self.shard_size)
        for name in sorted(self.key.outputs):
            h.update(np.ascontiguousarray(self._map(name, shard, write=False)[i]).data)
        return h.hexdigest()

    def _rows_in(self, shard: int) -> list[tuple[str, int, int]]:
        if self._by_shard is None:
            by: dict[int, list[tuple[str, int, int]]] = {}
            for sid, e in self.index.items():
                for v in e["views"]:
                    r = int(e["row"]) * self.key.views + int(v)
                    by.setdefault(r // self.shard_size, []).append((sid, int(v), r))
            self._by_shard = by
        return self._by_shard.get(shard, [])

    def _check_shard(self, shard: int) -> list[tuple[str, int, int]]:
        """(sample id, view, row) of the committed rows of `shard` whose bytes fail their checksum."""
        bad = []
        for sid, v, r in self._rows_in(shard):
            want = self.index[sid].get("sums", {}).get(str(v))
            if want is not None and self._row_sum(r) != want:  # no checksum: never served (`has`)
                bad.append((sid, v, r))
        self._verified.add(shard)
        return bad

    def _recheck_changed_shards(self) -> None:
        """Under the lock at open: re-hash shards whose file status changed or that a reader flagged;
        rows that fail lose their entry (the fill recomputes them)."""
        rows = max((e["row"] + 1 for e in self.index.values()), default=0) * self.key.views
        dropped, altered = 0, []
        for shard in range((rows + self.shard_size - 1) // self.shard_size):
            flag = self._flag(shard)
            if not flag.exists() and all(self._stats.get(p.name) == self._file_status(p)
                                         for p in self._shard_files(shard)):
                continue
            bad = self._check_shard(shard)
            for sid, v, _ in bad:
                entry = self.index[sid]
                entry["views"].remove(v)
                entry.get("sums", {}).pop(str(v), None)
            if bad:
                dropped += len(bad)
                altered.append(f"shard {shard}")
                self._by_shard = None
            if flag.exists():
                self._flags_cleared.add(flag)
            self._record_status(shard)  # checked: trusted until its files change again
            self._dirty = True
        if dropped:
            self.status += (f"; {dropped} entries failed their content checksum ({', '.join(altered)} "
                            "altered on disk): dropped and recomputed")

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
        # shards first (flushed, then their status noted), then the index, then the manifest that
        # vouches for both
        written = set()
        for (_, shard), mm in self._maps.items():
            if mm.mode != "r":
                mm.flush()
                written.add(shard)
        for shard in written:
            self._record_status(shard)
        atomic_write_text(self.dir / "index.json", json.dumps(self.index))
        rows = (max((e["row"] + 1 for e in self.index.values()), default=0)) * self.key.views
        atomic_write_text(self.dir / "manifest.json", json.dumps({
            "format": FORMAT, "version": VERSION, "key": self.key.to_dict(), "digest": self.digest,
            "shard_size": self.shard_size, "outputs": self.key.outputs, "rows": rows,
            "shards": dict(sorted(self._stats.items()))}, indent=1))
        for flag in self._flags_cleared:  # the dropped entries are published: the flag is handled
            flag.unlink(missing_ok=True)
        self._flags_cleared.clear()
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

        New ids get rows; an id whose fingerprint changed loses its stored views (recomputed), and so
        does a view without a content checksum.
        """
        views = list(range(self.key.views)) if views is None else list(views)
        out = []
        next_row = max((e["row"] + 1 for e in self.index.values()), default=0)
        for sid, fp in samples:
            entry = self.index.get(sid)
            if entry is None:
                entry = self.index[sid] = {"row": next_row, "fp": fp, "views": [], "sums": {}}
                next_row += 1
                self._dirty = True
                self._by_shard = None
            elif entry["fp"] != fp:
                entry.update(fp=fp, views=[], sums={})  # content changed: never serve the old features
                self._dirty = True
                self._by_shard = None
            out.extend((sid, v) for v in views if not self.has(sid, v))
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
        entry = self.index[sample_id]
        entry.setdefault("sums", {})[str(int(view))] = self._row_sum(r)  # of the bytes as stored
        if view not in entry["views"]:
            entry["views"].append(int(view))
            self._by_shard = None
        self._bad_rows.discard(r)
        self._dirty = True

    def commit(self) -> None:
        if self._dirty:
            self._write_meta()

    def has(self, sample_id: str, view: int, fingerprint: str | None = None) -> bool:
        e = self.index.get(sample_id)
        return (e is not None and view in e["views"] and str(int(view)) in e.get("sums", {})
                and (fingerprint is None or e["fp"] == fingerprint))

    def read(self, sample_id: str, view: int) -> dict[str, np.ndarray]:
        """name -> float32 array for (sample, view); DataError if it was never computed or its bytes
        fail their checksum (the shard is checked the first time this process reads from it)."""
        if not self.has(sample_id, view):
            raise DataError(f"teacher cache {self.dir} has no entry for sample {sample_id!r} view {view}")
        r = self.row(sample_id, view)
        shard = r // self.shard_size
        if shard not in self._verified:
            bad = self._check_shard(shard)
            if bad:
                self._bad_rows.update(row for _, _, row in bad)
                with contextlib.suppress(OSError):  # a read-only cache: the next reader finds it again
                    self._flag(shard).touch()
                progress(f"teacher cache {self.dir}: {len(bad)} entries of shard {shard} fail their content "
                         "checksum (altered on disk); they are not served and the next run recomputes them")
        if r in self._bad_rows:
            raise DataError(f"teacher cache {self.dir}: the stored targets of sample {sample_id!r} view "
                            f"{view} (shard {shard}) fail their content checksum: the shard was altered on "
                            "disk. They were not used; run again (--resume continues) and they are "
                            "recomputed")
        return {n: np.asarray(self._map(n, shard, write=False)[r % self.shard_size], dtype=np.float32)
                for n in self.key.outputs}

    def close(self) -> None:
        self.commit()
        self._maps.clear()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open their own memmaps
        d = dict(self.__dict__)
        d["_maps"] = {}
        d["_by_shard"] = None  # rebuilt on first use; checked shards stay checked
        return d


__all__ = ["CacheKey", "TeacherCache", "fingerprint_bytes", "fingerprint_file"]
