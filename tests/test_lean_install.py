"""A runtime-only install (`pip install "mirage-edge[onnxruntime]"`): toolkit commands fail in one line
naming the extra to install; help and the torch-free runtime still work.

The install is simulated in a child interpreter whose import system refuses every toolkit package
(as a real missing package does: `ModuleNotFoundError` with `.name` set).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

TOOLKIT_ONLY = ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnxslim", "nncf", "safetensors",
                "rich", "scipy", "sklearn", "matplotlib", "tifffile")

LEAN_PRELUDE = textwrap.dedent(
    f"""
    import sys
    _BLOCKED = {set(TOOLKIT_ONLY)!r}
    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in _BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, _NotInstalled())
    from mirage_edge.cli import main
    main()
    """
)


def lean_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`mirage-edge ARGS` in a fresh interpreter without the toolkit packages (run in `cwd`: some
    commands write default output folders there)."""
    return subprocess.run([sys.executable, "-c", LEAN_PRELUDE, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=_env())


def _env() -> dict[str, str]:
    # the child runs outside the repository; it must still import this checkout's mirage_edge
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _png_dataset(root: Path) -> Path:
    from mirage_edge.data.io import write_png

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            for i in range(2):
                img = rng.integers(0, 255, (32, 32), dtype=np.uint8)
                write_png(root / split / cls / f"s{i}_{cls}.png", img)
    return root


def _assert_named_extra(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 3, f"{what}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{what}:\n{proc.stderr[-3000:]}"
    assert 'pip install "mirage-edge[toolkit]"' in proc.stderr, f"{what}:\n{proc.stderr[-3000:]}"
    error_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1 and "is not installed" in error_lines[0], proc.stderr


def test_every_toolkit_command_names_the_extra(tmp_path):
    data = _png_dataset(tmp_path / "data")
    dummy = tmp_path / "weights.pth"
    dummy.write_bytes(b"not really")
    commands = [
        ["export", "mirage-tiny", "--format", "onnx", "--out", "art"],
        ["info", "mirage-tiny"],
        ["convert", str(dummy), "converted"],
        ["data", "synth", "--out", "synth", "--kind", "layers", "--n", "3", "--size", "64"],
        ["data", "check", str(data)],
        ["data", "figure", "--out", "fig.png", "--real", str(data)],
        ["distill", "--student", "mobilenetv4_conv_small", "--data", str(data), "--out", "distilled"],
        ["train", "finetune", "--task", "cls", "--data", str(data), "--out", "ft"],
        ["train", "pretrain", "--data", str(data), "--out", "pt"],
        ["demo", "--out", "demo", "--fast"],
    ]
    for args in commands:
        _assert_named_extra(lean_cli(*args, cwd=tmp_path), " ".join(args))


def test_debug_still_shows_the_traceback(tmp_path):
    proc = lean_cli("--debug", "info", "mirage-tiny", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModuleNotFoundError" in proc.stderr


def test_help_works_without_the_toolkit(tmp_path):
    top = lean_cli("--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    assert "Usage: mirage-edge" in top.stdout and "predict" in top.stdout
    sub = lean_cli("predict", "--help", cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    assert "ARTIFACT" in sub.stdout


def test_runtime_predict_on_an_onnx_artifact(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    import cv2

    from mirage_edge.data.io import write_png
    from mirage_edge.export import export_model
    from test_export_support import target, tiny_cnn

    (art,) = export_model(tiny_cnn(), tmp_path / "art", target(formats=["onnx"], precisions=["fp32"],
                                                                 validation={"n_inputs": 2}))
    rng = np.random.default_rng(3)
    img = write_png(tmp_path / "b.png", rng.integers(0, 255, (70, 60), dtype=np.uint8))
    ok = lean_cli("predict", str(art), str(img), "--out", "pred", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "pred" / "predictions.csv").is_file()

    # A volume saved as one multi-page TIFF is refused by name, also without tifffile.
    stack = tmp_path / "volume.tif"
    assert cv2.imwritemulti(str(stack), [rng.integers(0, 255, (70, 60), dtype=np.uint8) for _ in range(5)])
    bad = lean_cli("predict", str(art), str(stack), "--out", "pred2", cwd=tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"{stack}: a TIFF with 5 pages" in bad.stderr
