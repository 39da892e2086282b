"""Teacher-cache index at scale: commit and lookup cost at 10k, 100k and 1M rows.

    python -m mirage_edge.distill.cache_scale_bench --rows 1000000 --out benchmarks/results/cache-scale-epyc-kvm-2cpu

Fills a simulated cache (one output of 4 floats per row: the index is what is measured, not the
teacher or the disk bandwidth) the way ``fill_cache`` does, in blocks of ``--block`` rows: ``missing``
for the block's new ids, ``write`` of each row, ``commit``. At each mark it records

- ``commit_ms``: one ``commit()`` of a block (median / p90 over the ``--window`` blocks before the mark),
  and its two parts as ``commit()`` reports them: ``flush_ms`` (the shards' msync: file system work,
  the same for any index) and ``index_ms`` (the SQLite transaction),
- ``block_ms``: the whole block (``missing`` + writes + ``commit``),
- ``missing_all_s``: ``missing`` over every id in the cache, all present (what a rerun does first),
- ``open_s``: ``open()`` of the cache by a new process state (validation: one stat per shard file),
- ``read_cold_ms`` / ``read_warm_ms``: a random ``read`` whose shard this process has not checked yet
  (the first read of a shard hashes its rows) / has checked,
- ``index_bytes``: ``index.sqlite`` (+ its WAL) on disk.

Writes ``cache-scale.json`` (the records, the command and the machine) into ``--out`` and prints it.
``--cache-module FILE`` times another implementation of the same ``TeacherCache`` API (for example
format 1, ``git show <commit>:mirage_edge/distill/cache.py > /tmp/cache_v1.py``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, load, Python, SQLite, numpy, the file system of --work."""
    return {"cpu_model": _cpu_model(), "arch": platform.machine(), "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "hypervisor": "hypervisor" in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""),
            "os": platform.platform(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "numpy": np.__version__}


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cache_class(module_file: str | None) -> Any:
    if not module_file:
        from mirage_edge.distill.cache import CacheKey, TeacherCache

        return CacheKey, TeacherCache
    spec = importlib.util.spec_from_file_location("cache_under_test", module_file)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]  # dataclasses look their module up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.CacheKey, mod.TeacherCache


def _ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": 1e3 * statistics.median(xs), "p90": 1e3 * xs[min(len(xs) - 1, int(0.9 * len(xs)))],
            "n": len(xs)}


def measure(rows: int, work: str, marks: list[int], block: int = 256, shard_size: int = 256, window: int = 20,
            reads: int = 200, seed: int = 0, cache_module: str | None = None, log=print) -> dict[str, Any]:
    """Fill a cache of `rows` rows under `work` and measure it at every mark (see module docstring)."""
    CacheKey, TeacherCache = _cache_class(cache_module)
    key = CacheKey(teacher_hash="0" * 64, outputs={"t": [4]}, preprocess={"bench": "cache-scale"})
    sid = "1a2b3c4d:train/{:07d}".format  # the shape of a real id: folder tag, split/id
    fp = "0123456789abcdef" * 2
    value = np.arange(4, dtype=np.float32)
    rng = random.Random(seed)
    marks = sorted(m for m in marks if m <= rows) or [rows]
    if marks[-1] != rows:
        marks.append(rows)
    cache = TeacherCache(work, key, shard_size).open()
    out: list[dict[str, Any]] = []
    commits: list[float] = []
    parts: dict[str, list[float]] = {"flush_s": [], "index_s": []}
    blocks: list[float] = []
    t_fill, n = time.perf_counter(), 0
    for mark in marks:
        while n < mark:
            ids = [sid(i) for i in range(n, min(mark, n + block))]
            t0 = time.perf_counter()
            for s, v in cache.missing([(i, fp) for i in ids]):
                cache.write(s, v, {"t": value})
            t1 = time.perf_counter()
            got = cache.commit()
            t2 = time.perf_counter()
            for k, v in (got or {}).items():  # format 1's commit returns None
                if k in parts:
                    parts[k].append(v)
            commits.append(t2 - t1)
            blocks.append(t2 - t0)
            n += len(ids)
        fill_s = time.perf_counter() - t_fill
        rec: dict[str, Any] = {"rows": n, "fill_s_so_far": fill_s, "commit_ms": _ms(commits[-window:]),
                               "block_ms": _ms(blocks[-window:]), "load_1min": _load()}
        rec.update({k.replace("_s", "_ms"): _ms(v[-window:]) for k, v in parts.items() if v})
        cache.close()
        t0 = time.perf_counter()
        fresh = TeacherCache(work, key, shard_size).open()
        rec["open_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        left = fresh.missing([(sid(i), fp) for i in range(n)])
        rec["missing_all_s"] = time.perf_counter() - t0
        rec["missing_per_id_us"] = 1e6 * rec["missing_all_s"] / n
        assert left == [], f"{len(left)} rows missing after the fill"
        # one row from each of `reads` distinct shards: the first read of each checks its shard (cold)
        shards = rng.sample(range((n + shard_size - 1) // shard_size), min(reads, (n + shard_size - 1) // shard_size))
        picks = [min(n - 1, s * shard_size + rng.randrange(shard_size)) for s in shards]
        cold, warm = [], []
        for times in (cold, warm):
            for i in picks:
                t0 = time.perf_counter()
                got = fresh.read(sid(i), 0)
                times.append(time.perf_counter() - t0)
        assert np.array_equal(got["t"], value)
        rec["read_cold_ms"] = _ms(cold)
        rec["read_warm_ms"] = _ms(warm)
        rec["index_bytes"] = sum(p.stat().st_size for p in Path(fresh.dir).glob("index*"))
        fresh.close()
        cache = TeacherCache(work, key, shard_size).open()  # carry on filling from a reopened cache
        out.append(rec)
        split = (f" = flush {rec['flush_ms']['median']:.2f} + index {rec['index_ms']['median']:.2f}"
                 if "index_ms" in rec else "")
        log(f"{n:>9} rows: commit {rec['commit_ms']['median']:.2f} ms{split} (p90 {rec['commit_ms']['p90']:.2f}), block "
            f"{rec['block_ms']['median']:.1f} ms, missing(all) {rec['missing_all_s']:.2f} s, open "
            f"{rec['open_s']:.2f} s, read cold {rec['read_cold_ms']['median']:.3f} ms / warm "
            f"{rec['read_warm_ms']['median']:.3f} ms, index {rec['index_bytes'] / 1e6:.1f} MB")
    cache.close()
    return {"bench": "cache-scale", "implementation": cache_module or "mirage_edge.distill.cache",
            "rows": rows, "block": block, "shard_size": shard_size, "window_blocks": window, "reads": reads,
            "output": {"t": [4]}, "dtype": key.dtype, "marks": out, "machine": machine(),
            "command": " ".join(["python -m mirage_edge.distill.cache_scale_bench", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


@click.command(help=(__doc__ or "").split("\n")[0])
@click.option("--rows", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option("--marks", default="10000,100000,1000000", show_default=True, help="Row counts to measure at.")
@click.option("--block", type=click.IntRange(min=1), default=256, show_default=True, help="Rows per commit.")
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--window", type=click.IntRange(min=1), default=20, show_default=True,
              help="Blocks before each mark whose commit times are summarised.")
@click.option("--reads", type=click.IntRange(min=2), default=200, show_default=True)
@click.option("--work", default=None, help="Folder for the simulated cache (default: a temporary folder, deleted).")
@click.option("--out", default=None, help="Folder for cache-scale.json (default: print only).")
@click.option("--name", default="cache-scale.json", show_default=True)
@click.option("--cache-module", default=None, help="Time the TeacherCache of this file instead (same API).")
def main(rows: int, marks: str, block: int, shard_size: int, window: int, reads: int, work: str | None,
         out: str | None, name: str, cache_module: str | None) -> None:
    mk = [int(m) for m in marks.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        rec = measure(rows, tmp, mk, block, shard_size, window, reads, cache_module=cache_module,
                      log=lambda m: click.echo(m, err=True))
    text = json.dumps(rec, indent=1)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
