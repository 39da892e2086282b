"""The teacher cache says what it will cost before filling, and refuses when it will not fit."""
from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch

from mirage_edge.distill.recipe import load_recipe

FAST = ["stage1.epochs=1", "stage2.epochs=0", "stage1.batch_size=4", "data.image_size=64", "run.progress=false",
        "run.eval_batch_size=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mirage_edge.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("room") / "layers", "layers", 8, seed=0, size=64)


def _recipe(data, tmp_path, *extra):
    return load_recipe("tiny-demo", [f"data.path={json.dumps(str(data))}", f"cache.dir={json.dumps(str(tmp_path / 'c'))}",
                                     f"out={json.dumps(str(tmp_path / 'run'))}", *FAST, *extra])


def test_cache_cost_is_announced_and_matches_the_shards(data, tmp_path):
    from mirage_edge.distill import distill
    from mirage_edge.distill.loop import cache_cost

    logs: list[str] = []
    torch.manual_seed(0)
    distill(_recipe(data, tmp_path), log=logs.append)
    line = next(m for m in logs if m.startswith("teacher cache: ") and "rows" in m)
    assert "to compute" in line and "GB free" in line
    folder = next(p for p in (tmp_path / "c").iterdir() if p.is_dir())
    manifest = json.loads((folder / "manifest.json").read_text())
    from mirage_edge.distill.cache import CacheKey

    key = CacheKey(**{k: v for k, v in manifest["key"].items() if k != "format_version"})
    rows = int(line.split("teacher cache: ")[1].split(" rows")[0])
    shards = sum(p.stat().st_size for p in folder.glob("*.npy"))
    # the values alone fit in the shards; the announced on-disk size counts whole shards and matches
    # the .npy files up to their headers (128 bytes each)
    assert cache_cost(key, rows) <= shards
    announced = float(line.split(" GB on disk")[0].rsplit(", ", 1)[1]) * 1e9
    n_files = len(list(folder.glob("*.npy")))
    assert abs(shards - announced) <= 0.001 * shards + 128 * n_files + 5e-4 * announced


def test_cache_refused_above_max_gb_or_the_free_space(data, tmp_path, monkeypatch):
    from mirage_edge.distill import distill
    from mirage_edge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"above cache.max_gb = 1e-09"):
        distill(_recipe(data, tmp_path, "cache.max_gb=1e-9"), log=lambda m: None)
    import mirage_edge.distill.loop as loop

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"only 0.00 GB are free"):
        distill(_recipe(data, tmp_path / "b"), log=lambda m: None)


def test_non_finite_teacher_outputs_are_named_not_blamed_on_the_learning_rate(data, tmp_path, monkeypatch):
    from mirage_edge.distill import distill
    from mirage_edge.distill.teacher import Teacher
    from mirage_edge.errors import DataError

    real = Teacher.targets

    def nan_targets(self, batch, **k):
        out = real(self, batch, **k)
        return {name: torch.full_like(v, float("nan")) for name, v in out.items()}

    monkeypatch.setattr(Teacher, "targets", nan_targets)
    with pytest.raises(DataError, match="not finite"):
        distill(_recipe(data, tmp_path), log=lambda m: None)
