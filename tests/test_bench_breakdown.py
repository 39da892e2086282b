"""`mirage-edge bench breakdown` (#19 item 4): a tiny two-layer artifact whose weights are named like
torch's (`model.encoder...`, `model.head...`) is profiled; its parts add up to the wall time, none is
negative, each layer lands in its part and the JSON record is written. No timing is asserted."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="openvino is not installed: the breakdown profiles OpenVINO")

from mirage_edge.bench.breakdown import PARTS, breakdown, label_ops, node_part  # noqa: E402
from mirage_edge.bench.crosscheck import write_record  # noqa: E402

SIZE = 32


def make_named_artifact(out: Path) -> Path:
    """ONNX artifact: encoder conv (stride 2) -> relu -> head conv -> resize x2 -> argmax -> uint8 mask."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mirage_edge.artifact import ArtifactMeta, TensorSpec, write_meta, write_sha256sums
    from mirage_edge.data.preprocess import PreprocessSpec

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in (
        ("model.encoder.stem.weight", (8, 1, 3, 3)), ("model.encoder.stem.bias", (8,)),
        ("model.head.proj.weight", (3, 8, 1, 1)), ("model.head.proj.bias", (3,)))]
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [helper.make_node("Conv", ["image", "model.encoder.stem.weight", "model.encoder.stem.bias"], ["e"],
                              name="node_Conv_1", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["e"], ["r"], name="node_relu"),
             helper.make_node("Conv", ["r", "model.head.proj.weight", "model.head.proj.bias"], ["h"],
                              name="node_conv2d_2"),
             helper.make_node("Resize", ["h", "", "scales"], ["u"], name="node_resize", mode="nearest"),
             helper.make_node("ArgMax", ["u"], ["a"], name="node_argmax", axis=1, keepdims=0),
             helper.make_node("Cast", ["a"], ["mask"], name="node__to_copy", to=TensorProto.UINT8)]
    graph = helper.make_graph(nodes, "named", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                             ["batch", 1, SIZE, SIZE])],
                              [helper.make_tensor_value_info("mask", TensorProto.UINT8, ["batch", SIZE, SIZE])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out / "model.onnx"))
    spec = PreprocessSpec(size=(SIZE, SIZE), scaling="divide", interpolation="nearest")
    meta = ArtifactMeta(task="segmentation", format="onnx", precision="fp32", files=["model.onnx"],
                        inputs=[TensorSpec("image", ["batch", 1, SIZE, SIZE], dynamic_axes={"0": "batch"})],
                        outputs=[TensorSpec("mask", ["batch", SIZE, SIZE], dtype="uint8", kind="mask",
                                            dynamic_axes={"0": "batch"})],
                        classes=["a", "b", "c"], preprocessing={"image": spec.to_dict()}, name="named")
    write_meta(out, meta)
    write_sha256sums(out)
    return out


def test_ops_are_labelled_by_their_weight_names(tmp_path):
    import openvino as ov

    art = make_named_artifact(tmp_path / "onnx-fp32")
    labels, named = label_ops(ov.Core().read_model(str(art / "model.onnx")))
    assert named == 2
    assert labels["node_Conv_1"] == "encoder" and labels["node_relu"] == "encoder"
    assert labels["node_conv2d_2"] == "head"
    # the cast that makes the output takes its name (`mask`) in OpenVINO
    assert labels["node_resize"] == labels["node_argmax"] == labels["mask"] == "output"
    # executed nodes: suffixed names, fused ops (the later part wins), plugin-inserted reorders
    assert node_part(["node_conv2d_2/WithoutBiases"], labels) == "head"
    assert node_part(["node_Conv_1", "node_relu"], labels) == "encoder"
    assert node_part(["node_Conv_1_abcd_acdb_node_relu"], labels) == "encoder"
    assert node_part(["node_relu_abcd_acdb_node_conv2d_2/WithoutBiases"], labels) is None  # the ends disagree
    assert node_part(["somebody_else"], labels) is None


def test_breakdown_parts_add_up_to_the_wall_time_and_are_recorded(tmp_path):
    art = make_named_artifact(tmp_path / "named" / "onnx-fp32")
    res = breakdown(art, threads=1, iters=20, warmup=2)
    assert set(res.parts_ms) == set(PARTS)
    assert all(math.isfinite(v) and v >= 0 for v in res.parts_ms.values()), res.parts_ms
    assert sum(res.parts_ms.values()) == pytest.approx(res.wall_ms, rel=1e-6)
    assert res.parts_ms["encoder"] > 0 and res.parts_ms["head"] > 0
    assert res.labels_from == "the artifact's own weight names" and res.named_layers == 2
    assert res.wall_ms > 0 and res.unprofiled_wall_ms > 0 and res.input == f"{SIZE}x{SIZE}"
    assert any(line.startswith("encoder") for line in res.lines())
    rec = json.loads(write_record(res, tmp_path / "out" / "b.json").read_text())
    assert rec["kind"] == "breakdown" and set(rec["shares"]) == set(PARTS)
    assert sum(rec["shares"].values()) == pytest.approx(1.0, abs=1e-6)


def test_cli_prints_the_table_and_writes_the_record(tmp_path):
    from click.testing import CliRunner

    from mirage_edge.bench.cli import bench_cmd

    art = make_named_artifact(tmp_path / "named" / "onnx-fp32")
    out = tmp_path / "rec.json"
    res = CliRunner().invoke(bench_cmd, ["breakdown", str(art), "--threads", "1", "--iters", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "overhead" in res.output and "copies" in res.output and out.is_file()


def test_gops_and_share_of_the_int8_peak_in_the_report():
    from mirage_edge.bench.hardware import HardwareInfo
    from mirage_edge.bench.record import BenchRecord
    from mirage_edge.bench.report import INT8_PEAK_GOPS, gops, peak_share, render_markdown
    from mirage_edge.bench.suite import TimingConfig

    epyc = dict(cpu_model="AMD EPYC [AuthenticAMD family 25 model 17]", cpu_flags="avx2 avx512f avx512_vnni")
    int8 = BenchRecord(model="s", backend="openvino", precision="int8", threads=2, batch=2, input_h=64, input_w=64,
                       latency_median_ms=4.0, gflops=2.0, **epyc)
    assert gops(int8) == pytest.approx(1000.0)  # 2 GFLOPs x 2 images / 4 ms
    assert peak_share(int8) == pytest.approx(1000.0 / INT8_PEAK_GOPS)
    fp32 = BenchRecord(**{**int8.__dict__, "precision": "fp32"})
    other_cpu = BenchRecord(**{**int8.__dict__, "cpu_model": "Intel Xeon"})
    one_thread = BenchRecord(**{**int8.__dict__, "threads": 1})
    old = BenchRecord(**{**int8.__dict__, "gflops": None})  # records without FLOPs stay readable
    assert peak_share(fp32) is None and peak_share(other_cpu) is None and peak_share(one_thread) is None
    assert gops(old) is None and peak_share(old) is None
    assert peak_share(other_cpu, TimingConfig(int8_peak_gops=2000.0)) == pytest.approx(0.5)  # the suite's peak
    md = render_markdown([int8, old], HardwareInfo(cpu_model="X", threads=2))
    row = next(line for line in md.splitlines() if line.startswith("| `s`"))
    assert "| 1000.0 |" in row and f"| {100 * 1000 / INT8_PEAK_GOPS:.1f}% |" in row


def test_timing_rounds_is_a_suite_key():
    from mirage_edge.bench.suite import DEFAULT_ROUNDS, TimingConfig, load_suite

    assert TimingConfig().rounds == DEFAULT_ROUNDS == 3
    assert load_suite("synthetic", ["timing.rounds=1"]).timing.rounds == 1
    with pytest.raises(Exception, match="timing.rounds must be >= 1"):
        load_suite("synthetic", ["timing.rounds=0"])
