"""Synthetic OCT generator: layouts pass `data check`, realistic pixel fractions, determinism, CLI."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mirage_edge.data.check import check_dataset
from mirage_edge.data.io import read_image
from mirage_edge.data.synth import PIXEL_FRACTION_RANGES, synthesize
from mirage_edge.errors import DataError


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def layers_set(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("s") / "layers", "layers", 48, seed=0, size=128)


@pytest.fixture(scope="module")
def fluid_set(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("s") / "fluid", "fluid", 120, seed=0, size=96)


def _check_fractions(report, kind):
    fr = report.pixel_fractions()
    for label, (lo, hi) in PIXEL_FRACTION_RANGES[kind].items():
        assert lo <= fr[label] <= hi, f"{kind}: {label} fraction {fr[label]:.4f} outside [{lo}, {hi}]"


def test_layers_set_passes_check_with_realistic_fractions(layers_set):
    report = check_dataset(layers_set)
    assert report.ok, report.problems
    assert report.index.task == "segmentation" and report.index.info.num_classes == 9
    counts = report.index.counts()
    assert sum(c["images"] for c in counts.values()) == 48
    assert all(c["volumes"] >= 1 for c in counts.values()) and set(counts) == {"train", "val", "test"}
    assert report.image_sizes == {"128x128": 48}
    _check_fractions(report, "layers")
    # every column is ordered top to bottom like a real layer map
    mask = report.index.info.lut()[read_image(report.index.samples("train")[0].mask)]
    assert (np.diff(mask, axis=0) >= 0).all()
    meta = json.loads((layers_set / "SYNTH.json").read_text())
    assert meta["kind"] == "layers" and meta["seed"] == 0


def test_fluid_set_fractions(fluid_set):
    report = check_dataset(fluid_set)
    assert report.ok
    assert report.index.info.labels == ["Background", "IRF", "SRF", "PED"]
    _check_fractions(report, "fluid")


def test_cls_and_multimodal(tmp_path):
    root = synthesize(tmp_path / "cls", "cls", 24, seed=1, size=64)
    report = check_dataset(root)
    assert report.ok and report.index.classes == ["CNV", "DME", "DRUSEN", "NORMAL"]
    for split, row in report.index.counts().items():
        assert all(row[c] >= 1 for c in report.index.classes), (split, row)
    assert sum(r["images"] for r in report.index.counts().values()) == 24
    # patients never cross splits
    vols = {s: {x.volume for x in report.index.samples(s)} for s in ("train", "val", "test")}
    assert not (vols["train"] & vols["test"]) and not (vols["train"] & vols["val"])
    mm = synthesize(tmp_path / "mm", "multimodal", 9, seed=1, size=64)
    rep = check_dataset(mm)
    assert rep.ok and rep.index.task == "multimodal"
    assert rep.index.modalities == ("bscan", "slo", "bscanlayermap")
    s = rep.index.samples("train")[0]
    assert read_image(s.modality("bscanlayermap")).max() <= 8
    slo = read_image(s.modality("slo"))
    assert slo.shape == (64, 64) and slo.std() > 5


def test_deterministic_and_seed_dependent(tmp_path):
    a = synthesize(tmp_path / "a", "fluid", 8, seed=5, size=64)
    b = synthesize(tmp_path / "b", "fluid", 8, seed=5, size=64, workers=2)  # scheduling must not matter
    c = synthesize(tmp_path / "c", "fluid", 8, seed=6, size=64)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    ia = read_image(next((a / "train" / "bscan").iterdir()))
    ic = read_image(next((c / "train" / "bscan").iterdir()))
    assert np.abs(ia.astype(int) - ic.astype(int)).mean() > 5


def test_centers_change_the_look(tmp_path):
    d = synthesize(tmp_path / "d", "layers", 3, seed=2, size=64)
    c = synthesize(tmp_path / "c", "layers", 3, seed=2, size=64, center="cirrus")
    b = synthesize(tmp_path / "b", "layers", 3, seed=2, size=64, center="bioptigen")
    img_d = read_image(next((d / "train" / "bscan").iterdir()))
    img_c = read_image(next((c / "train" / "bscan").iterdir()))
    img_b = read_image(next((b / "train" / "bscan").iterdir()))
    assert img_d.dtype == np.uint8 and img_b.dtype == np.uint16
    assert not np.array_equal(img_d, img_c)
    assert check_dataset(b).ok


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="kind"):
        synthesize(tmp_path / "x", "octa", 10)
    with pytest.raises(DataError, match="center"):
        synthesize(tmp_path / "x", "layers", 10, center="nope")
    with pytest.raises(DataError, match="at least 12"):
        synthesize(tmp_path / "x", "cls", 8)
    root = synthesize(tmp_path / "y", "layers", 3, size=32)
    with pytest.raises(DataError, match="not empty"):
        synthesize(root, "layers", 3, size=32)
    synthesize(root, "fluid", 3, size=32, overwrite=True)
    assert json.loads((root / "SYNTH.json").read_text())["kind"] == "fluid"


def test_cli_synth_and_check(tmp_path):
    from mirage_edge.cli import cli

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(cli, ["data", "synth", "--out", str(out), "--kind", "layers", "--n", "6", "--size", "48",
                              "--seed", "3"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["data", "check", str(out)])
    assert res.exit_code == 0, res.output
    assert "no problems found" in res.output and "RPE-BM" in res.output
    res = runner.invoke(cli, ["data", "check", str(out), "--json"])
    assert json.loads(res.output)["task"] == "segmentation"
    (out / "train" / "semseg" / sorted(p.name for p in (out / "train" / "semseg").iterdir())[0]).write_bytes(b"x")
    res = runner.invoke(cli, ["data", "check", str(out)])
    assert res.exit_code == 1 and "problem" in res.output
    res = runner.invoke(cli, ["data", "check", str(out), "--skip-bad"])
    assert res.exit_code == 0 and "excluded" in res.output


def test_figure(tmp_path, real_data):
    from mirage_edge.data.figure import synthetic_vs_real

    out = synthetic_vs_real(tmp_path / "fig.png", real_data.parent)
    img = read_image(out)
    assert img.shape[0] > 500 and img.shape[1] > 800
    with pytest.raises(DataError, match="real data not found"):
        synthetic_vs_real(tmp_path / "f2.png", tmp_path)
