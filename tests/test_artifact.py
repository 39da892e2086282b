"""ArtifactMeta <-> metadata.json, SHA256SUMS writing/verification, torch-free import."""
from __future__ import annotations

import json

import pytest

from conftest import run_without_torch
from mirage_edge.artifact import (ArtifactMeta, QuantizationInfo, SourceInfo, TensorSpec, load_verified_meta,
                                  read_meta, read_sha256sums, verify_sha256sums, write_meta, write_sha256sums)
from mirage_edge.errors import ArtifactError


def _meta(**kw) -> ArtifactMeta:
    base = dict(
        task="classification", format="onnx", precision="int8", files=["model.onnx"],
        inputs=[TensorSpec("bscan", ["batch", 1, 64, 64], dynamic_axes={"0": "batch"}, batch_range=[1, 8])],
        outputs=[TensorSpec("logits", ["batch", 3], kind="logits", dynamic_axes={"0": "batch"})],
        classes=["a", "b", "c"], modalities=["bscan"],
        preprocessing={"bscan": {"size": [64, 64], "scaling": "minmax"}},
        quantization=QuantizationInfo(method="ort-static-qdq", calibration_images=16, float_ops={"Softmax": 2}),
        source=SourceInfo(checkpoint="runs/x", checkpoint_sha256="ab" * 32, teacher="mirage-base"),
        parity={"top1_agreement": 1.0}, versions={"onnx": "1.23"}, mirage_edge_version="0.1.0",
    )
    base.update(kw)
    return ArtifactMeta(**base)


def _artifact(tmp_path, meta=None):
    (tmp_path / "model.onnx").write_bytes(b"fake model bytes")
    meta = meta or _meta()
    write_meta(tmp_path, meta)
    write_sha256sums(tmp_path, ["model.onnx", "metadata.json"])
    return tmp_path


def test_meta_json_round_trip(tmp_path):
    meta = _meta()
    write_meta(tmp_path, meta)
    back = read_meta(tmp_path)
    assert back == meta
    assert back.to_json() == meta.to_json()
    assert back.quantization.float_ops == {"Softmax": 2}
    assert back.inputs[0].shape == ["batch", 1, 64, 64]
    assert back.input_names == ["bscan"]


def test_meta_is_strict(tmp_path):
    data = _meta().to_dict()
    data["unexpected"] = 1
    with pytest.raises(ArtifactError, match="unexpected"):
        ArtifactMeta.from_dict(data)
    data = _meta().to_dict()
    data["precision"] = "int4"
    with pytest.raises(ArtifactError, match="precision"):
        ArtifactMeta.from_dict(data)


def test_meta_newer_schema_refused():
    data = _meta().to_dict()
    data["schema_version"] = 99
    with pytest.raises(ArtifactError, match="schema_version 99"):
        ArtifactMeta.from_dict(data)


def test_meta_requires_classes_for_logits():
    with pytest.raises(ValueError, match="classes"):
        _meta(classes=[])


def test_sha256sums_format_and_verify(tmp_path):
    d = _artifact(tmp_path)
    sums = read_sha256sums(d)
    assert set(sums) == {"model.onnx", "metadata.json"}
    line = (d / "SHA256SUMS").read_text().splitlines()[0]
    digest, name = line.split("  ")
    assert len(digest) == 64 and name in sums
    import hashlib

    assert sums["model.onnx"] == hashlib.sha256(b"fake model bytes").hexdigest()
    assert load_verified_meta(d).task == "classification"


def test_tampered_model_file_named(tmp_path):
    d = _artifact(tmp_path)
    (d / "model.onnx").write_bytes(b"fake model bytez")
    with pytest.raises(ArtifactError, match=r"checksum mismatch for .*model\.onnx"):
        load_verified_meta(d)


def test_tampered_metadata_named(tmp_path):
    d = _artifact(tmp_path)
    data = json.loads((d / "metadata.json").read_text())
    data["classes"] = ["x", "y", "z"]
    (d / "metadata.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"metadata\.json"):
        load_verified_meta(d)


def test_missing_and_unlisted_files(tmp_path):
    d = _artifact(tmp_path)
    (d / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx is listed in SHA256SUMS but missing"):
        verify_sha256sums(d)
    d2 = tmp_path / "b"
    d2.mkdir()
    _artifact(d2)
    write_sha256sums(d2, ["metadata.json"])  # model file not covered
    with pytest.raises(ArtifactError, match=r"model\.onnx is not listed"):
        load_verified_meta(d2)
    (d2 / "SHA256SUMS").unlink()
    with pytest.raises(ArtifactError, match="no SHA256SUMS"):
        load_verified_meta(d2)


def test_sums_reject_paths_outside(tmp_path):
    d = _artifact(tmp_path)
    (d / "SHA256SUMS").write_text("0" * 64 + "  ../etc/passwd\n")
    with pytest.raises(ArtifactError, match="outside the artifact"):
        verify_sha256sums(d)


def test_artifact_module_is_torch_free(tmp_path):
    _artifact(tmp_path)
    res = run_without_torch(
        """
        import sys
        from mirage_edge.artifact import load_verified_meta
        from mirage_edge.export.target import load_target
        m = load_verified_meta(sys.argv[1])
        t = load_target("cpu-openvino-int8")
        print(m.task, t.name, "torch" in sys.modules)
        """,
        str(tmp_path),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["classification", "cpu-openvino-int8", "False"]
