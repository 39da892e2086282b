"""Torch-free runtime: Predictor reproduces the torch pipeline, rejects bad input and tampered artifacts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import run_without_torch
from test_export_support import SIZE, exported  # also skips without torch/ORT/OV

import torch  # noqa: E402

from mirage_edge.data.io import read_image, write_png  # noqa: E402
from mirage_edge.errors import ArtifactError, InputError  # noqa: E402
from mirage_edge.export.data import synthetic_oct  # noqa: E402
from mirage_edge.runtime import Predictor  # noqa: E402


def _pngs(tmp_path: Path, n: int = 3) -> tuple[list[Path], list[Path]]:
    """n 8-bit and n 16-bit PNG B-scans of a non-model size (so resizing is exercised)."""
    imgs = synthetic_oct(n, (90, 75), seed=11)
    p8 = [write_png(tmp_path / f"b8_{i}.png", im) for i, im in enumerate(imgs)]
    rng = np.random.default_rng(1)
    p16 = [write_png(tmp_path / f"b16_{i}.png", (im.astype(np.uint16) * 200 + rng.integers(0, 200, im.shape))
                     .astype(np.uint16)) for i, im in enumerate(imgs)]
    return p8, p16


def _torch_pipeline(model, meta, files, kind: str) -> np.ndarray:
    """Independent torch path: read -> TorchPreprocess (torch twin of the spec) -> model -> head."""
    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.data.transforms import TorchPreprocess

    tp = TorchPreprocess(PreprocessSpec.from_dict(meta.preprocessing["bscan"]))
    x = torch.cat([tp(read_image(f))[None] for f in files])
    with torch.no_grad():
        if kind == "encoder":
            return model.forward_features(x).numpy()
        out = model(x)
        return (torch.softmax(out, 1) if kind == "cnn" else out.argmax(1)).numpy()


@pytest.mark.parametrize("kind", ["cnn", "seg", "encoder"])
@pytest.mark.parametrize("bits", [8, 16])
def test_runtime_reproduces_torch_pipeline(tmp_path, kind, bits):
    model, dirs = exported(kind)
    p8, p16 = _pngs(tmp_path)
    files = p8 if bits == 8 else p16
    assert read_image(files[0]).dtype == (np.uint8 if bits == 8 else np.uint16)
    for name in ("onnx-fp32", "openvino-fp32"):
        pred = Predictor.load(dirs[name])
        got = pred.predict(files)
        ref = _torch_pipeline(model, pred.meta, files, kind)
        assert got.shape == ref.shape
        if kind == "seg":
            assert got.dtype == np.uint8 and (got == ref).mean() > 0.999
        else:
            assert float(np.abs(got - ref).max()) < 1e-4, name
        single = pred.predict(files[0])  # one B-scan: no batch axis
        assert single.shape == ref.shape[1:]
    # int8: decision agreement with the torch pipeline
    got = Predictor.load(dirs["onnx-int8"]).predict(files)
    ref = _torch_pipeline(model, Predictor.load(dirs["onnx-int8"]).meta, files, kind)
    if kind == "cnn":
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.6
    elif kind == "seg":
        assert (got == ref).mean() > 0.9


def test_predict_forms_and_backends():
    _, dirs = exported("cnn")
    imgs = synthetic_oct(5, (70, 70), seed=2)
    p = Predictor.load(dirs["onnx-int8"])
    assert p.backend == "onnxruntime" and p.task == "classification" and p.classes == ["grade_0", "grade_1", "grade_2"]
    batch = p.predict(imgs)
    assert batch.shape == (5, 3) and np.allclose(batch.sum(1), 1, atol=1e-5)
    assert np.allclose(p.predict(list(imgs)), batch)
    assert np.allclose(p.predict(imgs[2]), batch[2])
    assert np.allclose(p.predict({"bscan": imgs}), batch)
    assert np.allclose(p.predict(imgs.astype(np.float32) / 255), batch, atol=1e-5)  # float input in [0, 1]
    ov = Predictor.load(dirs["onnx-fp32"], backend="openvino")  # ONNX on OpenVINO (f32 hint from metadata)
    ort = Predictor.load(dirs["onnx-fp32"])
    assert np.abs(ov.predict(imgs) - ort.predict(imgs)).max() < 1e-5
    with pytest.raises(ArtifactError, match="OpenVINO IR runs only"):
        Predictor.load(dirs["openvino-fp32"], backend="onnxruntime")


def test_bad_inputs_get_clear_errors():
    _, dirs = exported("cnn")
    p = Predictor.load(dirs["openvino-int8"])
    img = synthetic_oct(1, (64, 64), seed=0)[0]
    with pytest.raises(InputError, match=r"rank 4.*squeeze the channel axis"):
        p.predict(img[None, None])
    with pytest.raises(InputError, match="rank 1"):
        p.predict(img[0])
    bad = img.astype(np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(InputError, match="1 NaN/infinite"):
        p.predict(bad)
    with pytest.raises(InputError, match="unsupported dtype int32"):
        p.predict(img.astype(np.int32))
    with pytest.raises(InputError, match="unsupported dtype complex"):
        p.predict(img.astype(np.complex64))
    with pytest.raises(InputError, match=r"wrong modality set: got \['slo'\], this artifact takes \['bscan'\]"):
        p.predict({"slo": img})
    with pytest.raises(InputError, match="empty list"):
        p.predict([])
    with pytest.raises(InputError, match=r"\[1\]: expected an H x W"):
        p.predict([img, img[None]])
    with pytest.raises(InputError, match=r"must be N x 1 x 64 x 64"):
        p.run(np.zeros((1, 1, 32, 32), np.float32))


@pytest.mark.parametrize("victim", ["model.onnx", "metadata.json"])
def test_tampered_artifact_refused_naming_file(tmp_path, victim):
    _, dirs = exported("cnn")
    d = shutil.copytree(dirs["onnx-fp32"], tmp_path / "art")
    Predictor.load(d)
    data = bytearray((d / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"checksum mismatch for .*{victim.replace('.', '[.]')}"):
        Predictor.load(d)


def test_concurrent_callers_identical():
    _, dirs = exported("seg")
    imgs = synthetic_oct(6, (64, 64), seed=9)
    for name in ("onnx-int8", "openvino-int8"):
        p = Predictor.load(dirs[name])
        expected = [p.predict_logits(imgs[i:i + 2]) for i in range(0, 6, 2)]
        results: dict[tuple[int, int], np.ndarray] = {}
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for r in range(3):
                    k = (t + r) % 3
                    results[(t, r)] = (k, p.predict_logits(imgs[2 * k:2 * k + 2]))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        assert len(results) == 12
        for k, out in results.values():
            assert np.array_equal(out, expected[k]), name


def test_runtime_imports_no_torch(tmp_path):
    _, dirs = exported("cnn")
    p8, _ = _pngs(tmp_path, 2)
    ref = Predictor.load(dirs["openvino-int8"]).predict(p8)
    res = run_without_torch(
        """
        import sys, json
        import numpy as np
        from mirage_edge.runtime import Predictor
        out = {}
        for d in sys.argv[1:3]:
            out[d] = Predictor.load(d).predict(sys.argv[3:]).tolist()
        print(json.dumps(out))
        assert "torch" not in sys.modules
        """,
        str(dirs["onnx-int8"]), str(dirs["openvino-int8"]), *map(str, p8),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert np.allclose(out[str(dirs["openvino-int8"])], ref, atol=1e-6)


def test_predict_cli_writes_outputs(tmp_path):
    _, cls_dirs = exported("cnn")
    _, seg_dirs = exported("seg")
    p8, p16 = _pngs(tmp_path / "in", 2)
    res = run_without_torch(
        """
        import sys
        from mirage_edge.cli import main
        main(sys.argv[1:])
        """,
        "predict", str(cls_dirs["onnx-int8"]), str(tmp_path / "in"), "--out", str(tmp_path / "cls"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = (tmp_path / "cls" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "file,prediction,p_grade_0,p_grade_1,p_grade_2" and len(rows) == 5
    js = json.loads((tmp_path / "cls" / "predictions.json").read_text())
    assert len(js["predictions"]) == 4 and js["task"] == "classification"
    res = subprocess.run([sys.executable, "-m", "mirage_edge.cli", "predict", str(seg_dirs["openvino-int8"]),
                          str(p8[0]), str(p16[1]), "--out", str(tmp_path / "seg")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    mask = read_image(tmp_path / "seg" / "masks" / "b8_0.png")
    assert mask.shape == (90, 75) and mask.max() < 4  # original size, class indices
    overlay = (tmp_path / "seg" / "overlays" / "b16_1.png")
    assert overlay.is_file()
    res = subprocess.run([sys.executable, "-m", "mirage_edge.cli", "predict", str(seg_dirs["openvino-int8"]),
                          str(tmp_path / "nope.png"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode == 2 and "image not found" in res.stderr
