"""Latency measurement and peak-memory probes (torch-free).

`measure_latency` times a zero-argument callable with warm-up and a time budget: it runs at least
`min_iters` calls and stops once `budget_s` of timed calls have passed (or `max_iters` is reached),
so a 2 ms student gets hundreds of samples for stable p99 while a 1 s ViT-L row still ends in a few
seconds. Wall time per call is taken with `time.perf_counter`; the garbage collector is paused
during the timed loop so a collection does not land inside one sample.

`measure_interleaved` times several callables call by call in rotating order (e.g. one artifact's
engine call and its runtime call path), so a burst of load from another process lands on all of
them alike and their difference is meaningful on a shared CPU. `combine_rounds` merges the stats of
one row timed in several rounds (fresh processes, interleaved with the other rows): the row's median
is the median of its round medians, so one disturbed round neither wins nor loses a comparison.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import resource
import sys
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Per-call wall time in milliseconds over `n` timed calls."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    min_ms: float
    n: int
    warmup: int
    total_s: float

    @classmethod
    def from_samples(cls, samples_s: list[float] | np.ndarray, warmup: int = 0) -> "LatencyStats":
        s = np.asarray(samples_s, dtype=np.float64) * 1e3
        if s.size == 0:
            raise ValueError("no latency samples")
        p50, p90, p99 = np.percentile(s, [50, 90, 99])
        return cls(median_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), max_ms=float(s.max()),
                   mean_ms=float(s.mean()), min_ms=float(s.min()), n=int(s.size), warmup=warmup,
                   total_s=float(s.sum() / 1e3))


def measure_latency(fn: Callable[[], object], *, warmup: int = 3, min_iters: int = 5, max_iters: int = 500,
                    budget_s: float = 3.0, min_warmup_s: float = 0.0) -> LatencyStats:
    """Time `fn()` per call.

    Args:
        fn: one inference call (inputs already bound and preprocessed).
        warmup: calls discarded first (allocations, lazy kernel selection, caches).
        min_iters: timed calls always made, even past the budget (so slow models still get
            percentiles; with few samples p99 is close to max, and `n` says how many there were).
        max_iters: timed calls never exceeded.
        budget_s: stop timing once this much timed wall time has passed and `min_iters` are done.
        min_warmup_s: keep warming up at least this long (CPU frequency, thread pools spin-up).
    """
    if min_iters < 1 or max_iters < min_iters:
        raise ValueError(f"need 1 <= min_iters <= max_iters, got {min_iters}, {max_iters}")
    t_start = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - t_start) < min_warmup_s:
        fn()
        done += 1
    samples: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        elapsed = 0.0
        while len(samples) < max_iters and (len(samples) < min_iters or elapsed < budget_s):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            samples.append(dt)
            elapsed += dt
    finally:
        if gc_was_enabled:
            gc.enable()
    return LatencyStats.from_samples(samples, warmup=done)


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 3, min_iters: int = 5,
                        max_iters: int = 500, budget_s: float = 3.0,
                        min_warmup_s: float = 0.0) -> tuple[dict[str, LatencyStats], dict[str, list[float]]]:
    """Time every callable of `fns` call by call, rotating which goes first in each cycle.

    The budget counts the timed calls of all callables together (the row costs what one callable
    alone would); `min_iters` and `max_iters` apply to each. Returns ({name: stats}, {name: samples
    in seconds}) - the samples let several rounds of one row be pooled (`combine_rounds`).
    """
    if not fns:
        raise ValueError("nothing to time")
    if min_iters < 1 or max_iters < min_iters:
        raise ValueError(f"need 1 <= min_iters <= max_iters, got {min_iters}, {max_iters}")
    names = list(fns)
    t_start = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - t_start) < min_warmup_s:
        for name in names:
            fns[name]()
        done += 1
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        elapsed, cycle = 0.0, 0
        while cycle < max_iters and (cycle < min_iters or elapsed < budget_s):
            # rotate the order: a callable that always ran right after another would inherit its
            # cache state and any spin-down of its threads
            for name in names[cycle % len(names):] + names[:cycle % len(names)]:
                t0 = time.perf_counter()
                fns[name]()
                dt = time.perf_counter() - t0
                samples[name].append(dt)
                elapsed += dt
            cycle += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: LatencyStats.from_samples(samples[n], warmup=done) for n in names}, samples


# Rows slower than this per call are timed in one round by `run.run_suite`: their budget holds few
# calls anyway, and no comparison between them and the fast rows is close enough for load to flip it.
ROUND_MAX_CALL_MS = 200.0


@dataclasses.dataclass(frozen=True)
class RoundsSummary:
    """One row timed in `rounds` rounds: `median_ms` = median of the round medians (the row's p50),
    `best_round_ms` = the lowest round median, the other fields pooled over every timed call."""

    median_ms: float
    best_round_ms: float
    round_medians_ms: tuple[float, ...]
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    min_ms: float
    n: int
    rounds: int


def combine_rounds(round_medians_ms: list[float], samples_s: list[float] | np.ndarray) -> RoundsSummary:
    """Merge the rounds of one row: per-round medians (ms) and every timed call pooled (seconds)."""
    meds = [float(m) for m in round_medians_ms]
    if not meds:
        raise ValueError("no rounds to combine")
    pooled = LatencyStats.from_samples(samples_s)
    return RoundsSummary(median_ms=float(np.median(meds)), best_round_ms=min(meds), round_medians_ms=tuple(meds),
                         p90_ms=pooled.p90_ms, p99_ms=pooled.p99_ms, max_ms=pooled.max_ms, mean_ms=pooled.mean_ms,
                         min_ms=pooled.min_ms, n=pooled.n, rounds=len(meds))


# ---------------------------------------------------------------------------------------------
# peak resident memory
# ---------------------------------------------------------------------------------------------

def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (VmHWM, else getrusage)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        # ru_maxrss is KiB on Linux, bytes on macOS
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 if sys.platform == "darwin" else 1.0)
    return kb / 1024.0


def current_rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0, `/proc/self/clear_refs` = 5).

    Lets an in-process run report each row's own peak. Returns False where not supported.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def load_average() -> float | None:
    """1-minute load average (None where unknown); above the CPU count, latency is not trustworthy."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


__all__ = ["LatencyStats", "measure_latency", "measure_interleaved", "RoundsSummary", "combine_rounds",
           "ROUND_MAX_CALL_MS", "peak_rss_mb", "current_rss_mb", "reset_peak_rss", "load_average"]
