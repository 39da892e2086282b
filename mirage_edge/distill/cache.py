"""Teacher-output cache: teacher features computed once, stored in memory-mapped numpy shards
(float16, or int8 with a per-vector scale) and indexed by SQLite.

Why: the teacher (ViT-B/L at 512) costs far more than a student step, and its outputs for a given
image never change. Like EdgeSAM's saved embeddings and TinyViT's stored logits, we compute them once
and reuse them across epochs, runs and students.

Key. A cache lives in ``<root>/<digest[:16]>/`` where ``digest`` = SHA-256 of the canonical JSON of
:class:`CacheKey`: the teacher's weights hash, the teacher input modalities, the output names and
shapes, the storage dtype, the preprocessing spec, the augmentation config + seed + number of views,
and the format version. A different teacher, preprocessing, augmentation or dtype therefore never
reads another's files. Inside, every sample id carries a content fingerprint (hash of its source
files, see :mod:`mirage_edge.distill.fingerprints`); a changed file is recomputed, never served stale.

Storage dtype. ``float16``: each output as is. ``int8``: symmetric int8 with one float16 scale per
last-axis vector (per token for ``N x C`` token maps), ``x ~ q * scale``, ``|error| <= scale / 2`` =
``max|vector| / 254``; about half the bytes of float16 (:func:`quantize_int8`). Reads return float32.

Index. ``index.sqlite`` (SQLite in WAL mode) maps sample id -> (sample row, fingerprint) and each
written (sample, view) row -> checksum, and keeps the file status of every shard. A commit inserts
the rows written since the last one and the status of the shards they touched, in one short
transaction: its cost does not grow with the number of rows in the cache (``cache_scale_bench``
measures it), unlike format 1's ``index.json`` that was rewritten whole at every commit. ``missing``
looks ids up in batches through the primary keys.

Validation on open (``TeacherCache.open``): ``manifest.json`` must repeat the exact format version,
key and digest, the index must be a readable SQLite file of this digest, and every shard the index
lists must exist (a shard whose file status changed must also have the expected dtype/shape);
otherwise the folder is deleted and rebuilt (the reason is in ``cache.status``). A folder the same key
had under an older format version is deleted when this one is created (the status says so).
Writes: shards are flushed before the index transaction that publishes their rows commits, so a
crash only loses uncommitted rows; other processes see committed rows only.

Content checksums. Every committed (sample, view) row carries a checksum of its bytes in all
arrays, so a shard altered in place (same size, same header) is never served. Checking costs a read
of the shard, so it is done when it can matter, not for the whole cache at every start: ``open``
re-hashes only the shards whose file status (size, mtime, ctime, inode: recorded at each commit)
changed or that a reader flagged, and drops the rows that fail, which the fill then recomputes;
``read`` hashes each shard once per process the first time it serves from it (this also catches
changes that keep the file status, such as bit rot), refuses a failing row with a DataError, and
flags the shard (``shard.<n>.altered``) so the next ``open`` recomputes it.

Concurrency: runs that share a cache (two students distilled at once) validate and fill it under
an exclusive lock (``TeacherCache.locked``, POSIX ``flock`` on ``<digest[:16]>.lock``), so there is
one writer; rows, once committed, never move, so readers need no lock (SQLite's WAL lets them read
while the writer commits). A forked DataLoader worker opens its own SQLite connection.

Layout::

    manifest.json            {"format", "version", "key", "digest", "shard_size", "outputs", "dtype"}
    index.sqlite             meta(k, v): digest
                             samples(row, sid, fp)       one per sample id
                             entries(row, sum)           row of (sample, view) = sample row * views + view
                             shards(file, size, mtime_ns, ctime_ns, inode)   status when last checked/written
    <output>.<shard>.npy     shard_size x *shape, float16 or int8 (np.lib.format, memory-mapped)
    <output>.scale.<shard>.npy   int8 only: shard_size x *shape[:-1] float16 scales
    shard.<shard>.altered    a reader found a row of this shard that fails its checksum
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mirage_edge._io import atomic_write_text
from mirage_edge._log import progress
from mirage_edge.distill.fingerprints import BATCH, chunks, connect_sqlite, file_status
from mirage_edge.distill.fingerprints import fingerprint_bytes, fingerprint_file  # noqa: F401 (re-exported)
from mirage_edge.errors import DataError

FORMAT = "mirage-edge-teacher-cache"
VERSION = 2  # 1: index.json rewritten at every commit; 2: SQLite index, int8 storage
DTYPES = ("float16", "int8")
INDEX = "index.sqlite"
_MAX_MAPS = 256  # open shard maps per process (each holds a file descriptor; 1M rows = 3907 shards an output)
_SCHEMA = """
BEGIN;
CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE samples (row INTEGER PRIMARY KEY, sid TEXT NOT NULL UNIQUE, fp TEXT NOT NULL);
CREATE TABLE entries (row INTEGER PRIMARY KEY, sum BLOB NOT NULL);
CREATE TABLE shards (file TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER);
COMMIT;
"""


@dataclass
class CacheKey:
    """Everything that determines the stored teacher outputs of a sample (see module docstring)."""

    teacher_hash: str
    outputs: dict[str, list[int]]
    modalities: list[str] = field(default_factory=lambda: ["bscan"])
    preprocess: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(default_factory=dict)
    aug_seed: int = 0
    views: int = 1
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def to_dict(self, version: int = VERSION) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = {k: [int(x) for x in v] for k, v in sorted(self.outputs.items())}
        d["format_version"] = version
        return d

    def digest(self, version: int = VERSION) -> str:
        """SHA-256 of the key; `version` < VERSION gives the folder this key had in an older format."""
        text = json.dumps(self.to_dict(version), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def arrays(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """File stem -> (numpy dtype, shape of one row) of every array a row is stored in."""
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, shape in sorted(self.outputs.items()):
            out[name] = (self.dtype, tuple(int(x) for x in shape))
            if self.dtype == "int8":
                out[f"{name}.scale"] = ("float16", tuple(int(x) for x in shape[:-1]))
        return out

    def row_bytes(self) -> int:
        """Bytes one (sample, view) row takes in the shards (values and int8 scales)."""
        return sum(int(np.prod(s)) * np.dtype(dt).itemsize for dt, s in self.arrays().values())


# ------------------------------------------------------------------------------------------- int8
def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float16 scale per last-axis vector.

    x: float array of shape S (``N x C`` tokens: one scale per token). Returns q (int8, shape S, in
    [-127, 127]) and scale (float16, shape S[:-1]) with ``x ~ q * scale[..., None]`` and
    ``|x - q * scale| <= scale / 2`` (the scale is rounded up to float16 so no value clips). Raises
    ValueError when a vector's max |x| / 127 exceeds float16 (|x| > 8.3e6) or is not finite.
    """
    x = np.asarray(x, dtype=np.float32)
    v = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    amax = np.abs(v).max(axis=1)
    with np.errstate(over="ignore"):
        scale = (amax / 127).astype(np.float16)
    if not np.isfinite(scale).all():
        raise ValueError(f"values up to {float(np.nanmax(amax)):.3g} do not fit an int8 cache (float16 scale)")
    low = scale.astype(np.float32) * 127 < amax  # fp16 rounding went down: step up, never clip
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    s = scale.astype(np.float32)[:, None]
    q = np.divide(v, s, out=np.zeros_like(v), where=s > 0)
    q = np.clip(np.rint(q), -127, 127).astype(np.int8)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1] if x.ndim else ())


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``q * scale[..., None]`` (inverse of :func:`quantize_int8`)."""
    s = np.asarray(scale, dtype=np.float32)
    return np.asarray(q, dtype=np.float32) * (s[..., None] if np.ndim(q) else s)


# ------------------------------------------------------------------------------------------ cache
class TeacherCache:
    """Memory-mapped store of teacher outputs for (sample id, view). See module docstring."""

    def __init__(self, root: str | Path, key: CacheKey, shard_size: int = 256) -> None:
        if key.views < 1:
            raise ValueError(f"views must be >= 1, got {key.views}")
        self.key = key
        self.digest = key.digest()
        self.root = Path(root)
        self.dir = self.root / self.digest[:16]
        self.shard_size = int(shard_size)
        self.status = "unopened"
        self._arrays = key.arrays()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._maps: dict[tuple[str, int], np.memmap] = {}
        self._pending: dict[int, bytes] = {}  # rows written since the last commit -> checksum
        self._written: set[int] = set()  # shards written since the last commit
        self._made: set[str] = set()  # shard files created since the last commit
        self._stats: dict[str, list[int]] = {}  # shard file -> status when its rows were last checked/written
        self._verified: set[int] = set()  # shards whose committed rows this process has checked
        self._bad_rows: set[int] = set()  # rows that failed their checksum here: never served

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

    def _conn(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():
            # a forked DataLoader worker must not use its parent's connection (SQLite's rule): its own
            self._db, self._pid = connect_sqlite(self.dir / INDEX), os.getpid()
        return self._db

    def _close_db(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None

    def open(self) -> "TeacherCache":
        """Validate an existing cache folder (rebuild it if stale or broken) or start a new one."""
        self._close_db()
        self._maps.clear()
        self._pending, self._written, self._made = {}, set(), set()
        self._verified, self._bad_rows = set(), set()
        reason, changed = self._problem() if self.dir.exists() else (None, set())
        if self.dir.exists() and reason is None:
            self.status = "reused"
            self._recheck(changed)
            return self
        if self.dir.exists():
            self._close_db()
            shutil.rmtree(self.dir)
            self.status = f"rebuilt ({reason})"
        else:
            old = self._remove_old_versions()
            self.status = f"rebuilt ({old})" if old else "new"
        self._create()
        return self

    def _create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._conn().executescript(_SCHEMA)
        self._conn().execute("INSERT INTO meta VALUES ('digest', ?)", (self.digest,))
        self._stats = {}
        # the manifest last: it vouches for the folder (a crash before it leaves an "incomplete cache")
        atomic_write_text(self.dir / "manifest.json", json.dumps({
            "format": FORMAT, "version": VERSION, "key": self.key.to_dict(), "digest": self.digest,
            "shard_size": self.shard_size, "outputs": self.key.outputs, "dtype": self.key.dtype}, indent=1))

    def _remove_old_versions(self) -> str | None:
        """Delete the folder(s) this key had under older format versions (their rows are recomputed)."""
        gone = []
        for v in range(1, VERSION):
            old = self.root / self.key.digest(v)[:16]
            if not old.is_dir() or old == self.dir:
                continue
            lock = old.with_name(old.name + ".lock")
            try:
                import fcntl

                with open(lock, "a") as fh:  # a run of the older version filling it holds this lock: leave it
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(old, ignore_errors=True)
            except ImportError:
                shutil.rmtree(old, ignore_errors=True)
            except OSError:  # BlockingIOError: in use
                continue
            lock.unlink(missing_ok=True)
            gone.append(f"v{v} folder {old.name}")
        return f"format {', '.join(gone)} replaced by v{VERSION} and removed" if gone else None

    def _problem(self) -> tuple[str | None, set[int]]:
        """Why the folder cannot be used as is (None if it is consistent with this key), and the
        shards to re-hash: file status changed since it was recorded, or flagged by a reader."""
        man_path, idx_path = self.dir / "manifest.json", self.dir / INDEX
        if not man_path.is_file() or not idx_path.is_file():
            v1 = " (format 1)" if (self.dir / "index.json").is_file() else ""
            return f"manifest.json or {INDEX} missing{v1} (incomplete cache)", set()
        try:
            man = json.loads(man_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"unreadable metadata: {exc}", set()
        if man.get("format") != FORMAT or man.get("version") != VERSION:
            return f"format {man.get('format')!r} v{man.get('version')} is not {FORMAT!r} v{VERSION}", set()
        if man.get("digest") != self.digest or man.get("key") != json.loads(json.dumps(self.key.to_dict())):
            diff = sorted(k for k in self.key.to_dict() if (man.get("key") or {}).get(k) != self.key.to_dict()[k])
            return f"key mismatch in {', '.join(diff) or 'digest'} (teacher, preprocessing or augmentation changed)", set()
        if man.get("shard_size") != self.shard_size:
            return f"shard size {man.get('shard_size')} != {self.shard_size}", set()
        try:
            db = self._conn()
            owner = db.execute("SELECT v FROM meta WHERE k = 'digest'").fetchone()
            recorded = {r[0]: list(r[1:]) for r in db.execute("SELECT * FROM shards")}
        except sqlite3.DatabaseError as exc:
            self._close_db()
            return f"unreadable index {INDEX}: {exc}", set()
        if owner is None or owner[0] != self.digest:
            return f"{INDEX} belongs to another cache", set()
        changed = set()
        for file, status in recorded.items():
            p = self.dir / file
            now = file_status(p)
            if now == status:
                continue  # as last checked or written: trusted
            stem, _, shard = file[:-len(".npy")].rpartition(".")
            if now is None:
                return f"missing shard {file}", set()
            if stem not in self._arrays or not shard.isdigit():
                return f"unknown file {file} in the index", set()
            try:
                arr = np.load(p, mmap_mode="r")
            except (ValueError, OSError, EOFError) as exc:  # EOFError: empty file
                return f"corrupt shard {file}: {exc}", set()
            dtype, shape = self._arrays[stem]
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != (self.shard_size, *shape):
                want = (self.shard_size, *shape)
                return f"shard {file} has {arr.dtype} {arr.shape}, expected {dtype} {want}", set()
            changed.add(int(shard))
        changed.update(int(f.name.split(".")[1]) for f in self.dir.glob("shard.*.altered"))
        self._stats = recorded
        return None, changed

    # -- content checksums -------------------------------------------------------------------------
    def _flag(self, shard: int) -> Path:
        return self.dir / f"shard.{shard:05d}.altered"

    def _shard_files(self, shard: int) -> list[Path]:
        return [self._shard_path(stem, shard) for stem in self._arrays]

    def _status_rows(self, shards: Iterable[int]) -> list[tuple[Any, ...]]:
        """(file, size, mtime_ns, ctime_ns, inode) of the files of `shards`, for the shards table."""
        return [(p.name, *st) for s in shards for p in self._shard_files(s) if (st := file_status(p)) is not None]

    def _row_sum(self, r: int) -> bytes:
        """Checksum of row `r` as stored: its bytes in every array (values, int8 scales), in order."""
        h = hashlib.blake2b(digest_size=16)
        shard, i = divmod(r, self.shard_size)
        for stem in self._arrays:
            h.update(np.ascontiguousarray(self._map(stem, shard, write=False)[i]).data)
        return h.digest()

    def _check_shard(self, shard: int) -> list[int]:
        """The committed rows of `shard` whose bytes fail their checksum."""
        lo = shard * self.shard_size
        rows = self._conn().execute("SELECT row, sum FROM entries WHERE row BETWEEN ? AND ?",
                                    (lo, lo + self.shard_size - 1)).fetchall()
        self._verified.add(shard)
        return [r for r, want in rows if self._row_sum(r) != want]

    def _recheck(self, shards: set[int]) -> None:
        """At open: re-hash `shards` (changed on disk or flagged by a reader); rows that fail lose their
        entry (the fill recomputes them). Published at once, then the flags are removed."""
        if not shards:
            return
        bad: dict[int, list[int]] = {s: self._check_shard(s) for s in sorted(shards)}
        stats = self._status_rows(shards)
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        db.executemany("DELETE FROM entries WHERE row = ?", [(r,) for rows in bad.values() for r in rows])
        db.executemany("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?)", stats)  # checked: trusted
        db.execute("COMMIT")
        self._stats.update((s[0], list(s[1:])) for s in stats)
        for s in shards:
            self._flag(s).unlink(missing_ok=True)
        dropped = sum(len(rows) for rows in bad.values())
        if dropped:
            altered = ", ".join(f"shard {s}" for s, rows in bad.items() if rows)
            self.status += (f"; {dropped} entries failed their content checksum ({altered} altered on disk): "
                            "dropped and recomputed")

    # -- rows --------------------------------------------------------------------------------------
    def _shard_path(self, stem: str, shard: int) -> Path:
        return self.dir / f"{stem}.{shard:05d}.npy"

    def _map(self, stem: str, shard: int, write: bool) -> np.memmap:
        handle = self._maps.get((stem, shard))
        if handle is not None and (not write or handle.mode != "r"):
            return handle
        p = self._shard_path(stem, shard)
        dtype, shape = self._arrays[stem]
        if write and p.name not in self._stats and p.name not in self._made:
            # no committed row lives in it (a crash may have left it half made): start it afresh
            handle = np.lib.format.open_memmap(p, "w+", np.dtype(dtype), (self.shard_size, *shape))
            self._made.add(p.name)
        else:
            handle = np.load(p, mmap_mode="r+" if write else "r")
        self._maps.pop((stem, shard), None)
        self._maps[(stem, shard)] = handle
        while len(self._maps) > _MAX_MAPS:  # the oldest goes; written rows reach the file before commit
            old = self._maps.pop(next(iter(self._maps)))
            if old.mode != "r":
                old.flush()
        return handle

    def row(self, sample_id: str, view: int) -> int:
        """Row of (sample, view); KeyError for an id `missing` never saw."""
        got = self._conn().execute("SELECT row FROM samples WHERE sid = ?", (sample_id,)).fetchone()
        if got is None:
            raise KeyError(sample_id)
        return int(got[0]) * self.key.views + int(view)

    def missing(self, samples: Iterable[tuple[str, str]],
                views: Sequence[int] | None = None) -> list[tuple[str, int]]:
        """(sample id, view) pairs with no valid entry; `samples` are (sample id, fingerprint).

        New ids get rows; an id whose fingerprint changed loses its stored views (recomputed). Both are
        committed at once (a row without an entry is never served).
        """
        views = list(range(self.key.views)) if views is None else list(views)
        V = self.key.views
        samples = list(samples)
        db = self._conn()
        next_row = db.execute("SELECT coalesce(max(row) + 1, 0) FROM samples").fetchone()[0]
        out: list[tuple[str, int]] = []
        local: dict[str, tuple[int, str]] = {}  # ids given a row or a new fingerprint in this call
        new: list[tuple[int, str, str]] = []
        changed: list[tuple[str, int]] = []
        gone: set[int] = set()  # rows whose entries this call deletes
        for part in chunks(samples):
            ids = [sid for sid, _ in part]
            q = f"SELECT sid, row, fp FROM samples WHERE sid IN ({','.join('?' * len(ids))})"
            known = {sid: (row, fp) for sid, row, fp in db.execute(q, ids)}
            want = [known[s][0] * V + v for s in ids if s in known for v in views]
            have: set[int] = set(self._pending)
            for rows in chunks(want, 4 * BATCH):
                q = f"SELECT row FROM entries WHERE row IN ({','.join('?' * len(rows))})"
                have.update(r for (r,) in db.execute(q, rows) if r not in gone)
            for sid, fp in part:
                row, old = local.get(sid) or known.get(sid) or (None, None)
                if row is None:
                    local[sid] = (next_row, fp)
                    new.append((next_row, sid, fp))
                    next_row += 1
                elif old != fp:  # content changed: never serve the old features
                    local[sid] = (row, fp)
                    changed.append((fp, row))
                    for r in range(row * V, row * V + V):
                        self._pending.pop(r, None)
                        have.discard(r)
                        gone.add(r)
                else:
                    out.extend((sid, v) for v in views if row * V + v not in have)
                    continue
                out.extend((sid, v) for v in views)
        if new or changed:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO samples VALUES (?, ?, ?)", new)
            db.executemany("UPDATE samples SET fp = ? WHERE row = ?", changed)
            db.executemany("DELETE FROM entries WHERE row BETWEEN ? AND ?",
                           [(r * V, r * V + V - 1) for _, r in changed])
            db.execute("COMMIT")
        return out

    def write(self, sample_id: str, view: int, outputs: Mapping[str, np.ndarray]) -> None:
        """Store one (sample, view)'s outputs (name -> array of the key's shape); commit() to publish."""
        if set(outputs) != set(self.key.outputs):
            raise ValueError(f"outputs {sorted(outputs)} != cache outputs {sorted(self.key.outputs)}")
        r = self.row(sample_id, view)
        shard, i = divmod(r, self.shard_size)
        self._written.add(shard)
        for name, arr in outputs.items():
            arr = np.asarray(arr)
            if tuple(arr.shape) != tuple(self.key.outputs[name]):
                raise ValueError(f"output {name!r} has shape {arr.shape}, cache expects {self.key.outputs[name]}")
            try:
                if self.key.dtype == "int8":
                    q, scale = quantize_int8(arr)
                    self._map(f"{name}.scale", shard, write=True)[i] = scale
                else:
                    with np.errstate(over="ignore"):
                        q = arr.astype(self.key.dtype)
                    if not np.isfinite(q).all():
                        raise ValueError(f"values beyond +-65504 (or not finite) do not fit {self.key.dtype}")
            except ValueError as exc:
                raise DataError(f"teacher output {name!r} of sample {sample_id!r} view {view}: {exc}") from exc
            self._map(name, shard, write=True)[i] = q
        self._pending[r] = self._row_sum(r)  # of the bytes as stored
        self._bad_rows.discard(r)

    def commit(self) -> dict[str, float]:
        """Publish the rows written since the last commit: shards flushed first, then one transaction
        with their checksums and the shards' file status (cost independent of the rows in the cache).
        Returns {"rows": rows published, "flush_s": shard flush time, "index_s": index transaction time}."""
        if not self._pending:
            return {"rows": 0, "flush_s": 0.0, "index_s": 0.0}
        t0 = time.perf_counter()
        for (_, shard), mm in self._maps.items():
            if shard in self._written and mm.mode != "r":
                mm.flush()
        stats = self._status_rows(self._written)
        t1 = time.perf_counter()
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?)", list(self._pending.items()))
        db.executemany("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?)", stats)
        db.execute("COMMIT")
        done = {"rows": len(self._pending), "flush_s": t1 - t0, "index_s": time.perf_counter() - t1}
        self._stats.update((s[0], list(s[1:])) for s in stats)
        self._pending, self._written, self._made = {}, set(), set()
        return done

    def _entry(self, sample_id: str, view: int) -> tuple[int, str] | None:
        """(row, fingerprint) of a written (sample, view), committed or pending; None without one."""
        got = self._conn().execute("SELECT row, fp FROM samples WHERE sid = ?", (sample_id,)).fetchone()
        if got is None:
            return None
        r = int(got[0]) * self.key.views + int(view)
        if r in self._pending or self._conn().execute("SELECT 1 FROM entries WHERE row = ?", (r,)).fetchone():
            return r, got[1]
        return None

    def has(self, sample_id: str, view: int, fingerprint: str | None = None) -> bool:
        e = self._entry(sample_id, view)
        return e is not None and (fingerprint is None or e[1] == fingerprint)

    def count(self) -> int:
        """Committed (sample, view) rows."""
        return int(self._conn().execute("SELECT count(*) FROM entries").fetchone()[0])

    def read(self, sample_id: str, view: int) -> dict[str, np.ndarray]:
        """name -> float32 array for (sample, view); DataError if it was never computed or its bytes
        fail their checksum (the shard is checked the first time this process reads from it)."""
        e = self._entry(sample_id, view)
        if e is None:
            raise DataError(f"teacher cache {self.dir} has no entry for sample {sample_id!r} view {view}")
        r = e[0]
        shard, i = divmod(r, self.shard_size)
        if shard not in self._verified:
            bad = self._check_shard(shard)
            if bad:
                self._bad_rows.update(bad)
                with contextlib.suppress(OSError):  # a read-only cache: the next reader finds it again
                    self._flag(shard).touch()
                progress(f"teacher cache {self.dir}: {len(bad)} entries of shard {shard} fail their content "
                         "checksum (altered on disk); they are not served and the next run recomputes them")
        if r in self._bad_rows:
            raise DataError(f"teacher cache {self.dir}: the stored targets of sample {sample_id!r} view "
                            f"{view} (shard {shard}) fail their content checksum: the shard was altered on "
                            "disk. They were not used; run again (--resume continues) and they are "
                            "recomputed")
        if self.key.dtype == "int8":
            return {n: dequantize_int8(self._map(n, shard, False)[i], self._map(f"{n}.scale", shard, False)[i])
                    for n in self.key.outputs}
        return {n: np.asarray(self._map(n, shard, write=False)[i], dtype=np.float32) for n in self.key.outputs}

    def close(self) -> None:
        self.commit()
        self._maps.clear()
        self._close_db()

    def __getstate__(self) -> dict[str, Any]:  # spawned DataLoader workers open their own memmaps and index
        d = dict(self.__dict__)
        d["_maps"], d["_db"], d["_pid"] = {}, None, 0
        return d


__all__ = ["CacheKey", "TeacherCache", "quantize_int8", "dequantize_int8", "fingerprint_bytes",
           "fingerprint_file", "FORMAT", "VERSION", "DTYPES"]
