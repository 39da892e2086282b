"""Manners: file modes follow the umask, multi-page TIFFs are refused by name, -q / -v logging."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from mirage_edge._io import atomic_write_text
from mirage_edge.data.io import read_image
from mirage_edge.errors import DataError


@pytest.fixture
def umask():
    """Set the process umask for one test (returns a setter); restores the old one after."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_write_honours_the_umask(tmp_path, umask, mask):
    umask(mask)
    p = tmp_path / "deep" / "f.json"
    atomic_write_text(p, "{}")
    assert _mode(p) == 0o666 & ~mask
    assert [x.name for x in p.parent.iterdir()] == ["f.json"]  # no temporary left behind


def _export_cli(*args: str, ckpt: Path, out: Path):
    from click.testing import CliRunner

    from mirage_edge.cli import cli

    res = CliRunner().invoke(cli, [*args, "export", str(ckpt), "--format", "onnx", "--precision", "fp32",
                                   "--set", "validation.n_inputs=2", "--set", 'exporter="torchscript"',
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    return res.output


def test_export_modes_and_log_levels(tmp_path, umask):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from mirage_edge.models import save_model
    from test_export_support import mirage_seg

    ckpt = save_model(mirage_seg(), tmp_path / "ckpt")
    art = tmp_path / "art" / "onnx-fp32"

    verbose = _export_cli("-v", ckpt=ckpt, out=tmp_path / "art")
    assert f"debug: building {art} in " in verbose  # writer.staging_dir, a debug message
    # mkdtemp/mkstemp would leave drwx------ / -rw-------
    assert _mode(art) == 0o755
    assert {p.name: _mode(p) for p in art.iterdir()} == {
        "model.onnx": 0o644, "metadata.json": 0o644, "SHA256SUMS": 0o644}

    replacing = f"replacing the artifact at {art}"  # writer.publish, an info message
    quiet = _export_cli("-q", ckpt=ckpt, out=tmp_path / "art")
    assert replacing not in quiet and "debug:" not in quiet
    assert "ONNX export (" not in quiet  # progress lines obey -q too (mirage_edge._log)
    default = _export_cli(ckpt=ckpt, out=tmp_path / "art")
    assert replacing in default and "debug:" not in default and "ONNX export (" in default
    assert _mode(art) == 0o755


def test_quiet_and_verbose_exclude_each_other():
    from click.testing import CliRunner

    from mirage_edge.cli import cli

    res = CliRunner().invoke(cli, ["-q", "-v", "data", "--help"])
    assert res.exit_code == 2 and "exclude each other" in res.output


# ---------------------------------------------------------------------------------- multi-page TIFF
def _pages(n: int, dtype=np.uint16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((24, 20)) * 200).astype(dtype) for _ in range(n)]


def test_multi_page_tiff_is_an_error_naming_file_and_pages(tmp_path):
    import cv2

    p = tmp_path / "volume.tif"
    assert cv2.imwritemulti(str(p), _pages(5))
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: a TIFF with 5 pages.*<scan>_<slice>\.png"):
        read_image(p)
    one = tmp_path / "one.tif"
    assert cv2.imwritemulti(str(one), _pages(1))
    np.testing.assert_array_equal(read_image(one), _pages(1)[0])


def test_multi_page_tiff_through_tifffile_is_refused_too(tmp_path):
    tifffile = pytest.importorskip("tifffile")

    # float16 pages: OpenCV cannot decode them, so the tifffile fallback counts the pages
    p = tmp_path / "stack.tiff"
    tifffile.imwrite(p, np.stack(_pages(5, np.float16)), photometric="minisblack")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: a TIFF with 5 pages"):
        read_image(p)
    single = tmp_path / "single.tiff"
    tifffile.imwrite(single, _pages(1, np.float16)[0], photometric="minisblack")
    np.testing.assert_array_equal(read_image(single), _pages(1, np.float16)[0].astype(np.float32))


# ------------------------------------------------------------------ optimiser groups and schedule (part 4)
def test_layer_decay_gives_decoder_blocks_the_head_scale():
    """ARCHITECTURE.md §11: input adapter / global token id 0, encoder block i id i+1, head id L+1 (scale 1),
    also for a ConvNeXt head whose own blocks are named `head.blocks.<i>`."""
    pytest.importorskip("torch")
    from mirage_edge.models import create_model
    from mirage_edge.models.task import segmentation_model
    from mirage_edge.train.optim import param_groups

    model = segmentation_model(create_model("mirage-tiny", input_size=64), 4)
    names = [n for n, _ in model.named_parameters()]
    depth = 1 + max(int(n.split(".")[2]) for n in names if n.startswith("encoder.encoder."))
    assert any(n.startswith("head.blocks.") for n in names)
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.75) for n in g["param_names"]}
    for n in names:
        if n.startswith("head."):
            want = 1.0
        elif n.startswith("encoder.encoder."):
            want = 0.75 ** (depth - int(n.split(".")[2]))
        elif n.startswith(("encoder.input_adapters.", "encoder.global_tokens")):
            want = 0.75 ** (depth + 1)
        else:
            continue
        assert scale[n] == pytest.approx(want), n


def test_cosine_schedule_is_the_official_per_step_formula():
    """MAE/MIRAGE `adjust_learning_rate` per step: linear warm-up, then half-cosine to min_lr, then flat."""
    pytest.importorskip("torch")
    import math

    from mirage_edge.train.optim import CosineSchedule

    for base, total, warm, low in [(1e-4, 50, 7, 1e-6), (3e-2, 12, 0, 0.0), (1.0, 4, 6, 0.1)]:
        s = CosineSchedule(base, total, warm, low)
        for step in range(total + 3):
            if step < warm:
                want = base * step / warm
            else:
                t = min(1.0, (step - warm) / max(1, total - warm))
                want = low + (base - low) * 0.5 * (1 + math.cos(math.pi * t))
            assert s.lr_at(step) == pytest.approx(want, rel=1e-12, abs=1e-15), (base, total, warm, step)


def test_progress_lines_follow_the_mirage_edge_logger(capsys):
    import logging

    from mirage_edge._log import progress

    log = logging.getLogger("mirage_edge")
    old = log.level
    try:
        progress("step 1")
        log.setLevel(logging.WARNING)
        progress("step 2")
    finally:
        log.setLevel(old)
    assert capsys.readouterr().err == "step 1\n"
