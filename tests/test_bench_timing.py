"""The latency harness against a model of known cost (sleep), and the peak-RSS probes."""
from __future__ import annotations

import time

import numpy as np
import pytest

from mirage_edge.bench.timing import LatencyStats, measure_latency, peak_rss_mb, reset_peak_rss

SLEEP_S = 0.01


def test_sleep_model_percentiles_are_trustworthy():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(SLEEP_S)

    stats = measure_latency(fn, warmup=2, min_iters=20, max_iters=40, budget_s=0.3)
    # a sleep never returns early; a loaded 2-core machine can delay it, so the upper bound is generous
    assert stats.min_ms >= SLEEP_S * 1e3 * 0.999
    assert SLEEP_S * 1e3 <= stats.median_ms < SLEEP_S * 1e3 + 250
    assert stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.p99_ms <= stats.max_ms
    assert stats.min_ms <= stats.mean_ms <= stats.max_ms
    assert 20 <= stats.n <= 40
    assert len(calls) == stats.n + stats.warmup and stats.warmup == 2


def test_budget_stops_slow_models_after_min_iters():
    t0 = time.perf_counter()
    stats = measure_latency(lambda: time.sleep(0.05), warmup=1, min_iters=3, max_iters=1000, budget_s=0.01)
    assert stats.n == 3  # the budget was spent after the first call, min_iters still honoured
    assert time.perf_counter() - t0 < 30.0  # 1000 iterations would take 50 s; a loaded box stretches 4 x 50 ms


def test_max_iters_caps_fast_models():
    stats = measure_latency(lambda: None, warmup=0, min_iters=1, max_iters=7, budget_s=10.0)
    assert stats.n == 7


def test_stats_match_numpy_on_known_samples():
    samples = np.arange(1, 101) / 1000.0  # 1..100 ms
    s = LatencyStats.from_samples(samples)
    assert s.median_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(np.percentile(np.arange(1, 101), 90))
    assert s.p99_ms == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert s.max_ms == pytest.approx(100.0) and s.min_ms == pytest.approx(1.0) and s.n == 100


def test_bad_iteration_bounds_are_rejected():
    with pytest.raises(ValueError):
        measure_latency(lambda: None, min_iters=5, max_iters=2)


def test_peak_rss_sees_a_large_allocation():
    import mmap

    reset_peak_rss()
    before = peak_rss_mb()
    # fresh anonymous pages, touched: malloc may serve a numpy array from memory this process already
    # holds (after earlier tests in the same process), which would not move the peak
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\x01" * len(block))
    after = peak_rss_mb()
    block.close()
    assert after - before >= 50


def test_gflops_count_attention():
    """FLOPs of a one-layer attention model equal the hand count (2 x MACs), SDPA included."""
    import torch

    from mirage_edge.bench.runners import torch_gflops

    class Attn(torch.nn.Module):
        def forward(self, x):  # B x 1 x 8 x 16 -> tokens B x 8 x 16, self-attention
            t = x[:, 0]
            return torch.nn.functional.scaled_dot_product_attention(t[:, None], t[:, None], t[:, None])

    flops = torch_gflops(Attn(), 8, 16) * 1e9
    assert flops == pytest.approx(2 * 2 * 8 * 8 * 16)  # QK^T and AV: 2 matmuls of 8x16x8 MACs
