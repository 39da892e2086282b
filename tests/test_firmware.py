"""examples/firmware: the C program (OpenVINO C API) builds with gcc and agrees with the Python runtime."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_export_support import SIZE, exported, tiny_cnn  # also skips without torch/ORT/OV

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "examples" / "firmware"


def _openvino_c() -> Path:
    import openvino

    ov_dir = Path(openvino.__file__).parent
    header = ov_dir / "include" / "openvino" / "c" / "openvino.h"
    if not header.is_file():
        pytest.skip(f"the installed openvino wheel ships no C headers ({header} missing); the example needs "
                    "an OpenVINO archive: make OPENVINO_DIR=/path/to/openvino")
    if not list((ov_dir / "libs").glob("libopenvino_c.so*")):
        pytest.skip(f"libopenvino_c.so not found in {ov_dir / 'libs'}")
    return ov_dir


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler (gcc/cc) on PATH")
    if not shutil.which("make"):
        pytest.skip("make not on PATH")
    _openvino_c()
    build = tmp_path_factory.mktemp("fwbuild")
    res = subprocess.run(["make", "-C", str(FIRMWARE), f"PYTHON={sys.executable}", f"BUILD={build}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    exe = build / "mirage_infer"
    assert exe.is_file()
    return exe


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def firmware_artifact(tmp_path_factory) -> Path:
    from mirage_edge.export import export_model, load_target

    t = load_target("firmware-openvino-int8", ["quantization.calib_images=8", "validation.n_inputs=4"])
    (d,) = export_model(tiny_cnn(), tmp_path_factory.mktemp("fw"), t)
    return d


def test_c_example_matches_python_static_batch(binary, firmware_artifact, tmp_path):
    from mirage_edge.export.data import synthetic_oct
    from mirage_edge.runtime import Predictor

    p = Predictor.load(firmware_artifact)
    assert p.meta.inputs[0].shape == [1, 1, SIZE, SIZE]  # firmware target: static batch 1
    img = synthetic_oct(1, (SIZE + 10, SIZE - 6), seed=21)[0]  # non-model size: Python resizes
    feeds, _ = p.preprocess(img)
    feeds["bscan"].tofile(tmp_path / "in.raw")
    res = _run(binary, str(firmware_artifact / "model.xml"), str(tmp_path / "in.raw"), str(tmp_path / "out.raw"))
    assert res.returncode == 0, res.stderr
    assert "output shape: 1 x 3" in res.stdout
    got = np.fromfile(tmp_path / "out.raw", np.float32).reshape(1, 3)
    ref = p.predict_logits(img)[None]
    assert float(np.abs(got - ref).max()) <= 1e-5


@pytest.mark.parametrize("fmt", ["openvino-int8", "openvino-fp32", "onnx-fp32"])
def test_c_example_matches_python_batch_and_uint8(binary, tmp_path, fmt):
    from mirage_edge.export.data import synthetic_oct
    from mirage_edge.runtime import Predictor

    _, dirs = exported("seg")
    d = dirs[fmt]
    model = d / ("model.onnx" if fmt.startswith("onnx") else "model.xml")
    p = Predictor.load(d, backend="openvino")
    imgs = synthetic_oct(3, (SIZE, SIZE), seed=5)
    # float32 input, preprocessed by Python
    feeds, _ = p.preprocess(imgs)
    feeds["bscan"].tofile(tmp_path / "in.raw")
    res = _run(binary, str(model), str(tmp_path / "in.raw"), str(tmp_path / "out.raw"))
    assert res.returncode == 0, res.stderr
    ref = p.run(feeds)["logits"]
    got = np.fromfile(tmp_path / "out.raw", np.float32).reshape(ref.shape)
    assert float(np.abs(got - ref).max()) <= 1e-5
    # raw uint8 at the model size: the C program applies the min-max itself
    imgs.tofile(tmp_path / "in8.raw")
    res = _run(binary, str(model), str(tmp_path / "in8.raw"), str(tmp_path / "out8.raw"), "--uint8")
    assert res.returncode == 0, res.stderr
    got8 = np.fromfile(tmp_path / "out8.raw", np.float32).reshape(ref.shape)
    assert float(np.abs(got8 - p.predict_logits(imgs)).max()) <= 1e-5


def test_c_example_errors(binary, tmp_path):
    _, dirs = exported("seg")
    (tmp_path / "bad.raw").write_bytes(b"\0" * 12)
    res = _run(binary, str(dirs["openvino-int8"] / "model.xml"), str(tmp_path / "bad.raw"), str(tmp_path / "o.raw"))
    assert res.returncode == 2 and "not a multiple of one float32 sample" in res.stderr
    res = _run(binary, str(tmp_path / "missing.xml"), str(tmp_path / "bad.raw"), str(tmp_path / "o.raw"))
    assert res.returncode == 3 and "ov_core_read_model" in res.stderr
    res = _run(binary)
    assert res.returncode == 1 and "usage" in res.stderr
