"""Toy runners of known behaviour for the bench tests (importable by worker processes as
`test_bench_toys:<factory>`), a tiny segmentation set, and a hand-built ONNX artifact.

ThresholdSeg(t): pixel p -> logits (t - p, p - t), i.e. foreground where p > t. Its cost is a sleep.
The ONNX artifact computes the same function with a 1x1 Conv (weights -1/+1, bias 0.5/-0.5), so its
predictions must equal ThresholdSeg(0.5) exactly.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from mirage_edge.bench.runners import Runner
from mirage_edge.data.io import write_png
from mirage_edge.data.preprocess import PreprocessSpec

SIZE = 32


class ThresholdSeg(Runner):
    backend = "callable"
    task_kind = "seg"
    classes = ["Background", "Fluid"]

    def __init__(self, threshold: float = 0.5, cost_s: float = 0.0, precision: str = "fp32") -> None:
        self.threshold, self.cost_s, self.precision = threshold, cost_s, precision
        self.loaded_with: int | None = None

    def load(self, threads: int) -> None:
        self.loaded_with = threads

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.cost_s:
            time.sleep(self.cost_s)
        p = x - np.float32(self.threshold)
        return np.concatenate([-p, p], axis=1)

    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec(size=(SIZE, SIZE), scaling="divide", interpolation="nearest")


def teacher_seg() -> Runner:
    return ThresholdSeg(0.5, cost_s=0.004)


def student_seg() -> Runner:
    return ThresholdSeg(0.6, cost_s=0.001, precision="int8")


class _LoadFails(ThresholdSeg):
    def load(self, threads: int) -> None:
        raise RuntimeError("weights are unreadable")


def broken_seg() -> Runner:
    return _LoadFails()


class _Aborts(ThresholdSeg):
    def load(self, threads: int) -> None:
        os.abort()  # a native crash (e.g. a runtime segfaulting on a corrupted file)


def crashing_seg() -> Runner:
    return _Aborts()


def make_seg_set(root: Path, n_test: int = 6, size: int = 48, seed: int = 0) -> Path:
    """RetinaBench segmentation layout: bright blocks (some half-bright) on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    (root / "INFO.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "INFO.json").write_text(json.dumps({"0": {"value": 0, "label": "Background"},
                                                "1": {"value": 1, "label": "Fluid"}}))
    for split, n in (("train", 2), ("val", 2), ("test", n_test)):
        for i in range(n):
            img = rng.integers(10, 60, size=(size, size)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(4, size // 2, size=2)
            mask[y:y + 16, x:x + 16] = 1
            img[mask == 1] = 220
            img[y:y + 16, x:x + 6] = 140  # 0.55: foreground for t=0.5, background for t=0.6
            write_png(root / split / "bscan" / f"vol{i // 2}_{i % 2:02d}.png", img)
            write_png(root / split / "semseg" / f"vol{i // 2}_{i % 2:02d}.png", mask)
    return root


def make_onnx_artifact(out: Path, corrupt: bool = False, task: str = "segmentation", dynamic_hw: bool = False,
                       teacher: str = "") -> Path:
    """An ONNX segmentation artifact computing ThresholdSeg(0.5) on 1 x 1 x SIZE x SIZE input
    (task="encoder": the same graph declared as an encoder whose output is a feature map; dynamic_hw:
    any H x W, as `export --set dynamic_hw=true` declares it, still preprocessed to SIZE x SIZE;
    teacher: its metadata names the teacher it was distilled from, as a distilled student's does)."""
    import onnx
    from onnx import TensorProto, helper

    from mirage_edge.artifact import ArtifactMeta, SourceInfo, TensorSpec, write_meta, write_sha256sums

    out.mkdir(parents=True, exist_ok=True)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [-1.0, 1.0])
    b = helper.make_tensor("b", TensorProto.FLOAT, [2], [0.5, -0.5])
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"])
    h, w_ = ("height", "width") if dynamic_hw else (SIZE, SIZE)
    axes = {"0": "batch", **({"2": "height", "3": "width"} if dynamic_hw else {})}
    graph = helper.make_graph([node], "threshold", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                  ["batch", 1, h, w_])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, h, w_])],
                              initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out / "model.onnx"))
    spec = PreprocessSpec(size=(SIZE, SIZE), scaling="divide", interpolation="nearest")
    seg = task == "segmentation"
    meta = ArtifactMeta(task=task, format="onnx", precision="fp32", files=["model.onnx"],
                        inputs=[TensorSpec("image", ["batch", 1, h, w_], dynamic_axes=axes)],
                        outputs=[TensorSpec("logits", ["batch", 2, h, w_], kind="logits" if seg else "features",
                                            dynamic_axes=axes)],
                        classes=["Background", "Fluid"] if seg else [], preprocessing={"image": spec.to_dict()},
                        name="threshold", source=SourceInfo(model_name="threshold", teacher=teacher))
    write_meta(out, meta)
    write_sha256sums(out)
    if corrupt:
        data = bytearray((out / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (out / "model.onnx").write_bytes(bytes(data))
    return out


def test_threshold_toy_is_what_it_says():
    r = teacher_seg()
    x = np.array([[[[0.2, 0.55, 0.9]]]], np.float32)
    assert r.infer(x).argmax(1).tolist() == [[[0, 1, 1]]]
    assert student_seg().infer(x).argmax(1).tolist() == [[[0, 0, 1]]]


def test_onnx_artifact_matches_the_toy(tmp_path):
    import onnxruntime as ort

    art = make_onnx_artifact(tmp_path / "a")
    x = np.random.default_rng(0).random((2, 1, SIZE, SIZE), dtype=np.float32)
    got = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, teacher_seg().infer(x), atol=1e-6)
