"""Latency measurement and peak-memory probes (torch-free).

`measure_latency` times a zero-argument callable with warm-up and a time budget: it runs at least
`min_iters` calls and stops once `budget_s` of timed calls have passed (or `max_iters` is reached),
so a 2 ms student gets hundreds of samples for stable p99 while a 1 s ViT-L row still ends in a few
seconds. Wall time per call is taken with `time.perf_counter`; the garbage collector is paused
during the timed loop so a collection does not land inside one sample.
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


__all__ = ["LatencyStats", "measure_latency", "peak_rss_mb", "current_rss_mb", "reset_peak_rss", "load_average"]
