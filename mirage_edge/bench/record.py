"""BenchRecord: one flat row per (model, backend, precision, device, threads, batch, input size, task).

Benchmarks produce records; reports are made from records (DESIGN §4.8, timm `benchmark.py` +
`results/`). A record is flat (scalars only) so it round-trips through CSV and JSON unchanged and
so a spreadsheet can check every number the report prints. Torch-free.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Literal

from mirage_edge._io import atomic_write_text
from mirage_edge.errors import MirageEdgeError

Status = Literal["ok", "error", "skipped", "timeout"]

# The metric each task kind is judged by (Pareto plot y-axis, retention vs the teacher).
PRIMARY_METRIC = {"cls": "bacc", "seg": "dice"}
CLS_METRICS = ("bacc", "auroc", "ap", "f1", "mcc")
SEG_METRICS = ("dice", "iou", "hd95")


@dataclasses.dataclass
class BenchRecord:
    """One benchmark row. Latencies in ms, sizes in MB (2**20 bytes), memory in MB, metrics in [0, 1]
    (HD95 in pixels at ground-truth resolution). `None` means "not measured" (with the reason in
    `status`/`error`/`notes`), never zero."""

    # identity
    run_id: str = ""
    suite: str = ""
    model: str = ""                 # label from the suite, e.g. "teacher", "student", "mirage-base"
    role: str = "candidate"         # teacher | student | reference | candidate | baseline (labels-only twin)
    source: str = ""                # checkpoint/artifact folder or registry name
    weights: str = "trained"        # trained | random (random-weight rows are latency-only)
    backend: str = ""               # torch | onnxruntime | openvino | tensorrt | callable
    precision: str = ""             # fp32 | fp16 | bf16 | int8
    # int8 artifacts: share of compute ops (conv/matmul) quantized in the file that ran (its metadata)
    quantized_share: float | None = None
    device: str = "cpu"
    threads: int = 0
    batch: int = 1
    input_h: int = 0
    input_w: int = 0
    task: str = ""                  # task name from the suite ("" = latency only)
    task_kind: str = ""             # cls | seg
    # output contract of one call: logits (full K x H x W or K) | mask@S (class mask, argmax at stride S)
    # | features | "" (unknown); speed-ups are compared between rows of the same contract
    output: str = ""
    base_model: str = ""            # registered model / checkpoint the row was built from (artifacts: metadata)
    # outcome
    status: str = "ok"
    error: str = ""
    stage: str = ""                 # where it failed: load | latency | eval | worker
    # latency (per call of `batch` images)
    latency_median_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    latency_mean_ms: float | None = None
    latency_min_ms: float | None = None
    latency_n: int = 0
    # rounds: the row is timed in `latency_rounds` fresh processes interleaved with the other rows;
    # latency_median_ms is then the median of the round medians (listed, space-separated, in ms)
    latency_rounds: int = 0
    latency_round_medians: str = ""
    latency_best_round_ms: float | None = None
    # what the row's latency times (artifacts: the engine on a fixed-shape model, input copied in,
    # output copied out), and two parts timed interleaved with it: the engine alone on a pre-bound
    # input (what OpenVINO's benchmark_app reports) and the mirage-edge runtime's `Predictor.run`
    timed_call: str = ""
    latency_engine_ms: float | None = None
    latency_runtime_ms: float | None = None
    throughput_ips: float | None = None   # images per second at `batch` (= batch / median)
    load_time_s: float | None = None
    peak_rss_mb: float | None = None
    rss_method: str = ""
    file_size_mb: float | None = None
    params_m: float | None = None
    gflops: float | None = None           # 2 x MACs of matmul/conv/attention at (batch 1, input_h x input_w)
    # accuracy through this row's model/artifact
    eval_n: int = 0
    eval_input: str = ""                  # H x W the metrics were computed at (the model's own size)
    bacc: float | None = None
    auroc: float | None = None
    ap: float | None = None
    f1: float | None = None
    mcc: float | None = None
    dice: float | None = None
    iou: float | None = None
    hd95: float | None = None
    primary_metric: str = ""
    primary_value: float | None = None
    # agreement with the teacher's torch fp32 predictions on the same samples
    teacher_agreement: float | None = None  # cls: same top-1 class; seg: mean per-class Dice vs teacher masks
    metric_retention: float | None = None   # primary_value / teacher's primary_value
    # machine and versions (same for every row of a run; repeated so one row stands alone)
    hardware: str = ""
    cpu_model: str = ""
    cpu_flags: str = ""
    cpu_count: int = 0
    jetson: str = ""
    power_w: float | None = None
    load_avg: float | None = None         # 1-min load average when the row was timed (other processes' load)
    versions: str = ""
    timestamp: str = ""
    notes: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def label(self) -> str:
        """Short human name: 'student openvino int8'."""
        return f"{self.model} {self.backend} {self.precision}".strip()


# Backends that run a model in its training framework (the teacher's reference row); the others
# run exported artifacts.
SOURCE_BACKENDS = ("torch", "callable")


def is_teacher_reference(r: BenchRecord) -> bool:
    """The teacher's own (PyTorch) row: the reference of every latency ratio and metric retention."""
    return r.role == "teacher" and r.backend in SOURCE_BACKENDS


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BenchRecord))
_TYPES = {f.name: f.type for f in dataclasses.fields(BenchRecord)}


def _clean(value: Any) -> Any:
    """JSON cannot carry NaN/inf portably; they become None (= not measured)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def record_from_dict(data: dict[str, Any]) -> BenchRecord:
    """Build a record from a dict (JSON row or CSV row with string cells); unknown keys are errors."""
    unknown = set(data) - set(FIELDS)
    if unknown:
        raise MirageEdgeError(f"unknown BenchRecord field(s): {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = str(_TYPES[key])
        if isinstance(value, str) and tp != "str":
            if value == "":
                value = None if "None" in tp else 0
            elif tp.startswith("int"):
                value = int(value)
            else:
                value = float(value)
        kwargs[key] = _clean(value)
    return BenchRecord(**kwargs)


def records_to_json(records: Iterable[BenchRecord]) -> str:
    rows = [{k: _clean(v) for k, v in dataclasses.asdict(r).items()} for r in records]
    return json.dumps(rows, indent=1) + "\n"


def records_to_csv(records: Iterable[BenchRecord]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if v is None else _clean(v)) for k, v in dataclasses.asdict(r).items()})
    return buf.getvalue()


def write_records(records: list[BenchRecord], out_dir: str | Path, stem: str = "records") -> dict[str, Path]:
    """Write `<stem>.json` and `<stem>.csv` atomically; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv"}
    atomic_write_text(paths["json"], records_to_json(records))
    atomic_write_text(paths["csv"], records_to_csv(records))
    return paths


def read_records(path: str | Path) -> list[BenchRecord]:
    """Read records back from a `.json` or `.csv` file written by `write_records`."""
    p = Path(path)
    if not p.is_file():
        raise MirageEdgeError(f"records file not found: {p}")
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as fh:
            return [record_from_dict(row) for row in csv.DictReader(fh)]
    rows = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise MirageEdgeError(f"{p}: expected a JSON list of records")
    return [record_from_dict(r) for r in rows]


__all__ = ["BenchRecord", "FIELDS", "SOURCE_BACKENDS", "is_teacher_reference", "PRIMARY_METRIC", "CLS_METRICS", "SEG_METRICS", "write_records",
           "read_records", "records_to_csv", "records_to_json", "record_from_dict"]
