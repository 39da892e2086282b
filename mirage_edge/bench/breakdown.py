"""Where one call of an OpenVINO artifact spends its time: encoder, head, output, copies.

    mirage-edge bench breakdown demo-out/export/student/openvino-int8 --threads 2 --iters 200

The artifact's model is reshaped to the timed batch and compiled twice with the runtime's properties
(the artifact's OpenVINO hints, `threads` threads): once with performance counters on
(`PERF_COUNT`), once without. Each iteration times one call of each, interleaved: the input copied
into the request's own tensor, `infer()`, the outputs copied out (the bench row's call,
`runners.timed_calls`). For the profiled call, `get_profiling_info()` gives every executed node's
real time; they are summed per part over the iterations. Parts are means per call and add up to the
profiled call's wall time exactly:

- encoder / head / output: executed nodes, attributed by the rule below;
- unattributed: executed nodes the rule cannot place (shown, not guessed);
- overhead: `infer()` wall time minus the sum of its nodes (scheduling, waits between nodes, the
  profiler's own bookkeeping);
- copies: copying the input in and the outputs out.

Attribution rule (`label_ops`). The exporter (torch dynamo, then onnxslim) names ops after aten ops
(`node_Conv_675`, `node_linear`), not modules, but keeps the module path in the names of weights
(`model.encoder.body.conv_stem.weight`, `model.head.final_layer.bias`). So:

1. output: walking back from each model output through shape, argmax, cast and resize ops
   (`OUTPUT_TYPES`), every op met before the first other op;
2. an op fed by a named constant (a weight or bias, through the constant's own dequantize/convert
   ops) belongs to the part of the first module word in that name: `encoder`/`backbone` -> encoder,
   `head`/`decoder`/`neck` -> head;
3. a layer (conv/matmul) whose weight lost its name (folded by the exporter) takes the part of the
   consumer that names its bias, when that part comes later (encoder < head);
4. every other op takes the latest part among its inputs (encoder < head), and ops with no labelled
   input (the input's quantize, for one) take the part all their consumers share.

The names are read from the export's ONNX file when the artifact has an ONNX sibling of the same
checkpoint (same hash; `names_from` names another file): OpenVINO IRs lose the names of weights the
converter folds (the head's linear layer keeps only its bias name in ONNX, none in the IR) and
NNCF-quantized IRs lose them all. Labels match the profiled model's ops by name up to the first "/"
(`node_Conv_675/WithoutBiases` -> `node_Conv_675`); names that file lacks (ops the converter made, like
an argmax's TopK) take the profiled model's own labels. An executed node fusing ops of
several parts counts for the latest part; a layout/precision conversion the CPU plugin inserts
(`<producer>_abcd_acdb_<consumer>`) counts for its producer's and consumer's part when they agree.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mirage_edge.errors import ConfigError

PARTS = ("encoder", "head", "output", "unattributed", "overhead", "copies")
_ORDER = {"encoder": 0, "head": 1, "output": 2}
ENCODER_WORDS = ("encoder", "backbone")
HEAD_WORDS = ("head", "decoder", "neck")
LAYER_TYPES = frozenset({"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData",
                         "GroupConvolutionBackpropData"})
# ops that only reshape, pick (argmax), cast or resize the last layer's result on its way out
OUTPUT_TYPES = frozenset({"Result", "TopK", "ArgMax", "Convert", "Interpolate", "Squeeze", "Unsqueeze", "Reshape",
                          "Broadcast", "Tile", "Transpose", "Softmax", "DepthToSpace"})
_CONST_PASS = frozenset({"Constant", "Convert", "Multiply", "Subtract", "Add", "Reshape", "Transpose", "Unsqueeze",
                         "Squeeze", "FakeQuantize"})


def _base(name: str) -> str:
    return name.split("/", 1)[0]


def _word_part(name: str) -> str | None:
    """encoder/head from the first module word of a dotted weight name, else None."""
    for word in re.split(r"[.:/]", name):
        if word in ENCODER_WORDS:
            return "encoder"
        if word in HEAD_WORDS:
            return "head"
    return None


def _later(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if _ORDER[a] >= _ORDER[b] else b


def label_ops(model: Any) -> tuple[dict[str, str], int]:
    """{op name (full and up to the first "/"): part} for an `ov.Model`, and how many of its layers
    carry a weight or bias name (0: the names are gone, e.g. an NNCF-quantized IR). Rule: module doc."""
    ops = list(model.get_ordered_ops())
    const: dict[str, bool] = {}
    for op in ops:  # topological: inputs first
        kind = op.get_type_name()
        ins = [v.get_node() for v in op.input_values()]
        const[op.get_friendly_name()] = kind == "Constant" or (
            kind in _CONST_PASS and bool(ins) and all(const.get(i.get_friendly_name(), False) for i in ins))

    def named_part(op: Any) -> str | None:
        """Part from the names of the constants feeding `op` (through their dequantize ops)."""
        found: str | None = None
        stack = [v.get_node() for v in op.input_values()]
        seen: set[str] = set()
        while stack:
            node = stack.pop()
            name = node.get_friendly_name()
            if name in seen or not const.get(name, False):
                continue
            seen.add(name)
            if node.get_type_name() == "Constant":
                for n in {name, *node.output(0).get_names()}:
                    found = found or _word_part(n)
            stack.extend(v.get_node() for v in node.input_values())
        return found

    label: dict[str, str] = {}
    tail = [op for op in ops if op.get_type_name() == "Result"]
    while tail:
        op = tail.pop()
        if op.get_type_name() in OUTPUT_TYPES and label.get(op.get_friendly_name()) != "output":
            label[op.get_friendly_name()] = "output"
            tail.extend(v.get_node() for v in op.input_values() if not const.get(v.get_node().get_friendly_name()))
    own = {op.get_friendly_name(): named_part(op) for op in ops if not const[op.get_friendly_name()]}
    named_layers = sum(1 for op in ops if op.get_type_name() in LAYER_TYPES and own.get(op.get_friendly_name()))
    # ops between the model input and the first named op (the input's quantize, layout change)
    input_side: set[str] = set()
    for op in ops:
        name = op.get_friendly_name()
        if name in label or const[name]:
            continue
        feeds = [v.get_node() for v in op.input_values() if not const.get(v.get_node().get_friendly_name())]
        if own.get(name) is None and (op.get_type_name() == "Parameter" or (
                feeds and all(f.get_friendly_name() in input_side for f in feeds))):
            input_side.add(name)
            continue
        part = own.get(name)
        if part is None:
            for v in op.input_values():
                part = _later(part, label.get(v.get_node().get_friendly_name()))
        if part is not None:
            label[name] = part
    for op in ops:  # a layer whose weight the exporter folded into an unnamed constant: its bias names it
        name = op.get_friendly_name()
        if op.get_type_name() in LAYER_TYPES and own.get(name) is None and name in label:
            for out in op.outputs():
                for target in out.get_target_inputs():
                    consumer = own.get(target.get_node().get_friendly_name())
                    if consumer and consumer != "output" and _ORDER[consumer] > _ORDER[label[name]]:
                        label[name] = consumer
    for op in reversed(ops):  # input-side ops: the part their consumers share
        name = op.get_friendly_name()
        if name not in input_side:
            continue
        parts = {label.get(t.get_node().get_friendly_name()) for out in op.outputs() for t in out.get_target_inputs()}
        if len(parts) == 1 and None not in parts and "output" not in parts:
            label[name] = parts.pop()
    out: dict[str, str] = {}
    for name, part in label.items():
        out[name] = part
        out.setdefault(_base(name), part)
    return out, named_layers


def node_part(names: list[str], labels: dict[str, str]) -> str | None:
    """Part of an executed node from its original layer names (None: the rule cannot place it)."""
    part: str | None = None
    for name in names:
        hit = labels.get(name) or labels.get(_base(name))
        if hit is None:
            hit = _inserted_part(name, labels)
        part = _later(part, hit)
    return part


def _inserted_part(name: str, labels: dict[str, str]) -> str | None:
    """'<producer>_<a>_<b>_<consumer>' (a reorder or convert the plugin inserted): the part both ends share."""
    pieces = name.split("_")
    for i in range(1, len(pieces)):
        for j in range(i + 1, len(pieces)):
            left, right = "_".join(pieces[:i]), "_".join(pieces[j:])
            a = labels.get(left) or labels.get(_base(left))
            b = labels.get(right) or labels.get(_base(right))
            if a and b:
                return a if a == b else None
    return None


@dataclasses.dataclass
class BreakdownResult:
    """Mean ms per call of each part (they sum to `wall_ms`), with the nodes behind them."""

    artifact: str
    model_file: str
    precision: str
    threads: int
    batch: int
    input: str
    iters: int
    parts_ms: dict[str, float]
    wall_ms: float
    wall_median_ms: float
    infer_ms: float
    unprofiled_wall_ms: float
    unprofiled_wall_median_ms: float
    labels_from: str
    named_layers: int
    top_nodes: list[dict[str, Any]]
    unattributed_nodes: list[dict[str, Any]]
    openvino_properties: dict[str, str]
    rule: str
    load_avg: list[float]
    machine: str = ""
    versions: str = ""
    timestamp: str = ""

    def shares(self) -> dict[str, float]:
        return {k: v / self.wall_ms if self.wall_ms else 0.0 for k, v in self.parts_ms.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "breakdown", **dataclasses.asdict(self), "shares": self.shares()}

    def lines(self) -> list[str]:
        """The table: ms and % per part, then the largest nodes."""
        out = [f"{self.artifact} ({self.precision}), batch {self.batch}, {self.input}, {self.threads} threads, "
               f"{self.iters} calls; labels from {self.labels_from}",
               f"{'part':<14}{'ms':>9}{'%':>8}"]
        shares = self.shares()
        for part in PARTS:
            out.append(f"{part:<14}{self.parts_ms[part]:>9.3f}{100 * shares[part]:>7.1f}%")
        out.append(f"{'wall':<14}{self.wall_ms:>9.3f}{100.0:>7.1f}%   (median {self.wall_median_ms:.3f} ms)")
        out.append(f"without profiling: mean {self.unprofiled_wall_ms:.3f} ms, median "
                   f"{self.unprofiled_wall_median_ms:.3f} ms (profiled / not: "
                   f"{self.wall_ms / self.unprofiled_wall_ms:.3f})")
        out.append("largest nodes (mean ms per call):")
        for n in self.top_nodes[:10]:
            out.append(f"  {n['ms']:>7.3f}  {n['part'] or 'unattributed':<12} {n['type']:<20} {n['exec_type']:<24} "
                       f"{n['name'][:60]}")
        return out


def _labels_for(folder: Path, model_path: Path, meta: Any, core: Any, names_from: str | Path | None
                ) -> tuple[dict[str, str], int, str]:
    """Labels from the model file that keeps the most weight names: `names_from` when given, else an
    ONNX sibling of the same export (ONNX keeps every initializer's name; an IR loses the names of
    folded or quantized weights), else the artifact's own model, else an FP32 IR sibling."""
    from mirage_edge.artifact import read_meta
    from mirage_edge.runtime.backends import model_file

    if names_from is not None:
        src = Path(names_from)
        if src.is_dir():
            m = read_meta(src)
            src = model_file(src, m.format, m.files)
        if not src.is_file():
            raise ConfigError(f"names_from: no model file at {names_from}")
        labels, named = label_ops(core.read_model(str(src)))
        return {**label_ops(core.read_model(str(model_path)))[0], **labels}, named, str(src)
    sha = meta.source.checkpoint_sha256
    siblings: list[tuple[str, str, Path]] = []
    for sib in sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder):
        try:
            m = read_meta(sib)
        except Exception:  # noqa: BLE001 - not an artifact folder: skip it
            continue
        if sha and m.source.checkpoint_sha256 == sha and m.format in ("onnx", "openvino"):
            siblings.append((m.format, m.precision, model_file(sib, m.format, m.files)))
    order = ([p for f, q, p in siblings if f == "onnx" and q == "fp32"]
             + [p for f, q, p in siblings if f == "onnx" and q != "fp32"] + [model_path]
             + [p for f, q, p in siblings if f == "openvino" and q == "fp32"])
    # the profiled model's own labels fill the names the other file lacks (ops the converter created,
    # such as the TopK of an argmax, are named differently in each file; the output walk finds them)
    own, own_named = label_ops(core.read_model(str(model_path)))
    for src in order:
        labels, named = (own, own_named) if src == model_path else label_ops(core.read_model(str(src)))
        if named:
            return {**own, **labels}, named, "the artifact's own weight names" if src == model_path else str(src)
    return own, 0, "no weight names found (layers stay unattributed)"


def breakdown(artifact: str | Path, *, threads: int = 2, iters: int = 200, batch: int = 1, warmup: int = 5,
              names_from: str | Path | None = None, progress: Callable[[str], None] | None = None) -> BreakdownResult:
    """Profile `iters` calls of an OpenVINO/ONNX artifact on OpenVINO CPU and split the mean call per part."""
    from mirage_edge._deps import require
    from mirage_edge.bench.crosscheck import openvino_artifact
    from mirage_edge.bench.hardware import describe_hardware
    from mirage_edge.bench.runners import make_input
    from mirage_edge.runtime.backends import model_file

    say = progress or (lambda _m: None)
    if threads < 1 or iters < 1 or batch < 1 or warmup < 0:
        raise ConfigError(f"threads, iters and batch must be >= 1 and warmup >= 0, got {threads}, {iters}, {batch}, "
                          f"{warmup}")
    folder, meta = openvino_artifact(artifact, "the breakdown")
    ov = require("openvino", "the latency breakdown")
    core = ov.Core()
    path = model_file(folder, meta.format, meta.files)
    labels, named, labels_from = _labels_for(folder, path, meta, core, names_from)
    model = core.read_model(str(path))
    shapes = {}
    for i, name in enumerate(meta.input_names):
        h, w = (int(v) for v in meta.preprocessing[name]["size"])
        shapes[i] = [batch, 1, h, w]
    model.reshape({i: ov.PartialShape(s) for i, s in shapes.items()})
    props = {k: str(v) for k, v in (meta.runtime.get("openvino") or {}).items() if str(v) != "default"}
    props["INFERENCE_NUM_THREADS"] = str(threads)
    say(f"compiling {path} for batch {batch} (profiled and not)")
    profiled = core.compile_model(model, "CPU", {**props, "PERF_COUNT": "YES"})
    plain = core.compile_model(model, "CPU", props)
    runtime_names = {}
    for op in profiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        runtime_names[op.get_friendly_name()] = [n for n in info["originalLayersNames"].astype(str).split(",") if n]
    xs = [make_input(s[0], s[2], s[3], seed=i) for i, s in shapes.items()]
    req_p, req_u = profiled.create_infer_request(), plain.create_infer_request()

    def call(req: Any) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        for i, x in enumerate(xs):
            req.get_input_tensor(i).data[...] = x
        t1 = time.perf_counter()
        req.infer()
        t2 = time.perf_counter()
        for i in range(len(profiled.outputs)):
            np.array(req.get_output_tensor(i).data, copy=True)
        t3 = time.perf_counter()
        return t1 - t0 + t3 - t2, t2 - t1, t3 - t0

    for _ in range(warmup):
        call(req_p)
        call(req_u)
    load = [round(os.getloadavg()[0], 2)]
    node_s: dict[str, float] = {}
    node_info: dict[str, tuple[str, str]] = {}
    copies = infer = 0.0
    walls, plain_walls = [], []
    say(f"timing {iters} profiled and {iters} plain calls, interleaved")
    for it in range(iters):
        # alternate which goes first, so neither always runs on a cache warmed by the other
        order = (req_p, req_u) if it % 2 == 0 else (req_u, req_p)
        for req in order:
            c, inf, wall = call(req)
            if req is req_u:
                plain_walls.append(wall)
                continue
            copies += c
            infer += inf
            walls.append(wall)
            for p in req_p.get_profiling_info():
                if p.status.name != "EXECUTED":
                    continue
                node_s[p.node_name] = node_s.get(p.node_name, 0.0) + p.real_time.total_seconds()
                node_info.setdefault(p.node_name, (p.node_type, p.exec_type))
    load.append(round(os.getloadavg()[0], 2))
    per_call = 1e3 / iters
    parts = {p: 0.0 for p in PARTS}
    nodes = []
    for name, secs in node_s.items():
        part = node_part(runtime_names.get(name) or [name], labels)
        parts[part or "unattributed"] += secs * per_call
        kind, exec_type = node_info[name]
        nodes.append({"name": name, "ms": secs * per_call, "part": part, "type": kind, "exec_type": exec_type})
    node_ms = sum(n["ms"] for n in nodes)
    parts["overhead"] = infer * per_call - node_ms
    parts["copies"] = copies * per_call
    nodes.sort(key=lambda n: -n["ms"])
    hw = describe_hardware(threads=threads)
    h, w = shapes[0][2], shapes[0][3]
    return BreakdownResult(
        artifact=str(folder), model_file=str(path), precision=meta.precision, threads=threads, batch=batch,
        input=f"{h}x{w}", iters=iters, parts_ms=parts, wall_ms=float(np.sum(walls)) * per_call,
        wall_median_ms=float(np.median(walls)) * 1e3, infer_ms=infer * per_call,
        unprofiled_wall_ms=float(np.mean(plain_walls)) * 1e3,
        unprofiled_wall_median_ms=float(np.median(plain_walls)) * 1e3, labels_from=labels_from,
        named_layers=named, top_nodes=nodes[:25], unattributed_nodes=[n for n in nodes if n["part"] is None],
        openvino_properties=props, rule=RULE, load_avg=load, machine=hw.summary(), versions=hw.versions_str(),
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


RULE = ("output: ops walked back from each model output through shape/argmax/cast/resize ops; encoder/head: the "
        "first module word (encoder|backbone, head|decoder|neck) in the names of the weights or biases feeding an op, "
        "a layer with an unnamed weight taking its bias's part, other ops the latest part among their inputs "
        "(encoder < head), input-side ops their consumers' part; executed nodes: the latest part of their original "
        "ops; overhead = infer() wall - sum of node times; copies = input in + outputs out")


__all__ = ["BreakdownResult", "breakdown", "label_ops", "node_part", "PARTS", "OUTPUT_TYPES",
           "LAYER_TYPES", "RULE"]
