"""Exported-artifact metadata (`metadata.json`) and integrity (`SHA256SUMS`); torch-free.

An artifact is a folder written by `mirage_edge.export`:

    model.onnx | model.xml + model.bin | model.engine   the model file(s)
    metadata.json                                        `ArtifactMeta` as JSON (this module)
    SHA256SUMS                                           `<sha256>  <relative path>` per file (sha256sum format)

`ArtifactMeta` is the only contract between export and the runtime: the runtime reads the task,
classes, input names/shapes, preprocessing and runtime hints from it and nothing else. The same
JSON is embedded in ONNX `metadata_props` and OpenVINO `rt_info` under `METADATA_KEY`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mirage_edge import config as _config
from mirage_edge._io import atomic_write_text, sha256_file
from mirage_edge.errors import ArtifactError, ConfigError

# 2: quantization counts of the written file (quantizers, compute ops, share); verified_runtimes
SCHEMA_VERSION = 2
METADATA_FILE = "metadata.json"
SUMS_FILE = "SHA256SUMS"
# Key under which the metadata JSON is embedded in ONNX metadata_props / OpenVINO rt_info.
METADATA_KEY = "mirage_edge"

Task = Literal["encoder", "classification", "segmentation"]
Format = Literal["onnx", "openvino", "tensorrt"]
Precision = Literal["fp32", "fp16", "int8"]


def mask_dtype(num_classes: int) -> str:
    """dtype of a class-index mask: uint8 up to 256 classes (8x less to write than int64), else int64."""
    return "uint8" if num_classes <= 256 else "int64"


@dataclass
class TensorSpec:
    """One model input or output.

    `shape` holds ints for fixed axes and names (e.g. "batch") for dynamic ones; `dynamic_axes`
    maps axis index (as a string, JSON keys) to that name. `kind` says what an output means:
    "logits" (classification B x K or segmentation B x K x H x W), "mask" (B x H x W class
    indices, argmax in the graph, dtype `mask_dtype`), "features" (B x N x D tokens or B x C x h x w
    maps), "image" for inputs.
    """

    name: str
    shape: list[Any]
    dtype: str = "float32"
    dynamic_axes: dict[str, str] = field(default_factory=dict)
    kind: str = "image"
    # Per-input batch range an engine was built for (TensorRT profile) or [1, N] limits; optional.
    batch_range: list[int] = field(default_factory=list)

    @property
    def dynamic_hw(self) -> bool:
        """An image input (B x C x H x W) whose H and W are both symbolic (`export --set dynamic_hw=true`)."""
        return "2" in self.dynamic_axes and "3" in self.dynamic_axes


@dataclass
class QuantizationInfo:
    """How an INT8 artifact was quantized, so a reader can tell what is and is not integer."""

    method: str  # "ort-static-qdq" | "nncf-ptq" | "qat" | "qat-nncf" | "qat-fake-quant"
    calibration_images: int = 0
    calibration_source: str = ""  # a folder, or "generated (synthetic OCT-like, seed S)"
    op_types_quantized: list[str] = field(default_factory=list)
    # op type -> number of nodes of that type left in float (the "float ops" of DESIGN §3)
    float_ops: dict[str, int] = field(default_factory=dict)
    quantized_ops: dict[str, int] = field(default_factory=dict)
    activation_type: str = ""
    weight_type: str = ""
    per_channel: bool = True
    symmetric_activations: bool = False
    calibration_method: str = ""
    model_type: str = ""  # NNCF ModelType used ("transformer" or "default")
    notes: list[str] = field(default_factory=list)
    # Counted in the written model file itself (ONNX graph / OpenVINO IR), so the INT8 label is
    # checked against what ships: quantizer nodes (QuantizeLinear / FakeQuantize), and the compute
    # ops (conv, matmul, gemm) that take quantized inputs out of all compute ops.
    counted_in: str = ""
    quantizers: int = 0
    compute_ops_quantized: int = 0
    compute_ops_total: int = 0
    quantized_share: float | None = None


@dataclass
class SourceInfo:
    """Where the exported weights came from (hashes let users match artifacts to checkpoints)."""

    model_name: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    teacher: str = ""
    teacher_sha256: str = ""


@dataclass
class ArtifactMeta:
    """Everything the runtime needs to run an artifact, and the record of how it was made."""

    task: Task
    format: Format
    precision: Precision
    files: list[str]  # model files, relative to the artifact dir (metadata/SHA256SUMS excluded)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    schema_version: int = SCHEMA_VERSION
    name: str = ""
    classes: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)  # input order = modality order
    # input name -> mirage_edge.data.preprocess.PreprocessSpec.to_dict()
    preprocessing: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantization: QuantizationInfo | None = None
    source: SourceInfo = field(default_factory=SourceInfo)
    # validation numbers measured at export (max_abs, cosine, top1_agreement, dice, ...)
    parity: dict[str, Any] = field(default_factory=dict)
    # backend -> settings the runtime applies (e.g. {"openvino": {"INFERENCE_PRECISION_HINT": "f32"}})
    runtime: dict[str, dict[str, Any]] = field(default_factory=dict)
    # backend build facts: TensorRT version, GPU name, opset, exporter, ...
    build: dict[str, Any] = field(default_factory=dict)
    export_target: dict[str, Any] = field(default_factory=dict)  # the ExportTarget, as data
    versions: dict[str, str] = field(default_factory=dict)  # library versions at export
    mirage_edge_version: str = ""
    created: str = ""  # ISO-8601 UTC

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("an artifact needs at least one model file")
        if not self.inputs or not self.outputs:
            raise ValueError("an artifact needs at least one input and one output")
        if self.task in ("classification", "segmentation") and self.outputs[0].kind == "logits" \
                and not self.classes:
            raise ValueError(f"a {self.task} artifact must list its classes")

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _config.to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "ArtifactMeta":
        version = data.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ArtifactError(
                f"{source or 'metadata'}: schema_version {version!r} is newer than this mirage-edge "
                f"understands ({SCHEMA_VERSION}); upgrade mirage-edge"
            )
        try:
            return _config.from_dict(cls, data, source=source)
        except ConfigError as exc:
            raise ArtifactError(f"invalid artifact metadata: {exc}") from exc

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> "ArtifactMeta":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{source or 'metadata'} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ArtifactError(f"{source or 'metadata'} must hold a JSON object")
        return cls.from_dict(data, source=source)

    # -- convenience ----------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def replace(self, **changes: Any) -> "ArtifactMeta":
        return dataclasses.replace(self, **changes)


def write_meta(artifact_dir: str | Path, meta: ArtifactMeta) -> Path:
    """Write `metadata.json` atomically; returns its path."""
    path = Path(artifact_dir) / METADATA_FILE
    atomic_write_text(path, meta.to_json() + "\n")
    return path


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
_MODEL_SUFFIXES = (".onnx", ".xml", ".engine")


def not_an_artifact(path: str | Path) -> str | None:
    """Why `path` is not an artifact folder, when it is plainly something else, else None.

    Missing; a file (a model file inside an artifact, a checkpoint file, anything else); a training
    checkpoint folder (config.json + model.safetensors), a `train` or `distill` run folder (which
    `mirage-edge export` turns into an artifact); or a folder of several artifacts (an export's --out).
    """
    d = Path(path)
    if not d.exists():
        return f"artifact not found: {d} does not exist"
    export = "; export it first: mirage-edge export {src} --out DIR, then give DIR/<format>-<precision>"
    if not d.is_dir():
        if d.suffix.lower() in _MODEL_SUFFIXES and (d.parent / METADATA_FILE).is_file():
            return f"{d} is a model file; give its artifact folder {d.parent}"
        if d.suffix.lower() in _CHECKPOINT_SUFFIXES:
            return f"{d} is a checkpoint file, not an exported artifact" + export.format(src=d)
        return (f"{d} is a file, not an artifact folder (an artifact folder holds the model file(s), "
                f"{METADATA_FILE} and {SUMS_FILE}, as `mirage-edge export` writes them)")
    if (d / METADATA_FILE).is_file() or (d / SUMS_FILE).is_file():
        return None  # an artifact, maybe damaged: the caller names what is wrong
    if (d / "config.json").is_file() and ((d / "model.safetensors").is_file() or (d / "qat.json").is_file()):
        return f"{d} is a training checkpoint, not an exported artifact" + export.format(src=d)
    if (d / "recipe.toml").is_file() and (d / "student").is_dir():
        return f"{d} is a distill run folder, not an exported artifact" + export.format(src=d)
    if (d / "best" / "config.json").is_file():
        return f"{d} is a training run folder, not an exported artifact" + export.format(src=d / "best")
    inner = sorted(p for p in d.iterdir() if p.is_dir() and (p / METADATA_FILE).is_file())
    if inner:
        shown = ", ".join(str(p) for p in inner[:4]) + (" ..." if len(inner) > 4 else "")
        return f"{d} holds {len(inner)} artifact(s), it is not one itself: give one of {shown}"
    return None


def read_meta(artifact_dir: str | Path) -> ArtifactMeta:
    """Read `metadata.json` of an artifact folder (no checksum verification; see `verify_sha256sums`)."""
    d = Path(artifact_dir)
    why = not_an_artifact(d)
    if why:
        raise ArtifactError(why)
    path = d / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(f"{d} is not an artifact: {METADATA_FILE} is missing")
    return ArtifactMeta.from_json(path.read_text(encoding="utf-8"), source=str(path))


def _artifact_files(d: Path) -> list[str]:
    return sorted(
        p.relative_to(d).as_posix() for p in d.rglob("*")
        if p.is_file() and p.name != SUMS_FILE and not p.name.startswith(".")
    )


def write_sha256sums(artifact_dir: str | Path, files: list[str] | None = None) -> Path:
    """Write `SHA256SUMS` (sha256sum format) for `files` (default: every file in the folder)."""
    d = Path(artifact_dir)
    names = sorted(files) if files is not None else _artifact_files(d)
    lines = [f"{sha256_file(d / n)}  {n}" for n in names]
    path = d / SUMS_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_sha256sums(artifact_dir: str | Path) -> dict[str, str]:
    """Parse `SHA256SUMS` -> {relative path: hex digest}."""
    d = Path(artifact_dir)
    path = d / SUMS_FILE
    if not path.is_file():
        why = not_an_artifact(d)
        if why is None and not (d / METADATA_FILE).is_file():
            why = (f"{d} is not an artifact: it has neither {METADATA_FILE} nor {SUMS_FILE} (an artifact folder "
                   "holds the model file(s) and both, as `mirage-edge export` writes them)")
        raise ArtifactError(why or f"{d} has no {SUMS_FILE}; refusing an artifact that cannot be verified")
    sums: dict[str, str] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        name = name.lstrip("*")
        if not sep or len(digest) != 64 or not name:
            raise ArtifactError(f"{path}:{i}: malformed line {line!r}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{path}:{i}: path {name!r} points outside the artifact")
        sums[name] = digest.lower()
    return sums


def verify_sha256sums(artifact_dir: str | Path, required: list[str] | None = None) -> dict[str, str]:
    """Check every file listed in `SHA256SUMS`; raise `ArtifactError` naming the first bad file.

    `required` files (the model files and metadata.json) must be listed, so a file swapped in
    without a checksum is refused too. Returns the parsed sums.
    """
    d = Path(artifact_dir)
    sums = read_sha256sums(d)
    for name in required or []:
        if name not in sums:
            raise ArtifactError(f"{d / name} is not listed in {SUMS_FILE}; the artifact is incomplete or altered")
    for name, digest in sums.items():
        p = d / name
        if not p.is_file():
            raise ArtifactError(f"{p} is listed in {SUMS_FILE} but missing")
        actual = sha256_file(p)
        if actual != digest:
            raise ArtifactError(
                f"checksum mismatch for {p}: expected {digest[:16]}..., got {actual[:16]}...; "
                "the file is corrupted or was modified after export"
            )
    return sums


def load_verified_meta(artifact_dir: str | Path) -> ArtifactMeta:
    """`read_meta` + `verify_sha256sums` over the metadata and every model file it names."""
    # Checksums first: a tampered metadata.json must be reported as tampering, not as bad JSON.
    sums = verify_sha256sums(artifact_dir, required=[METADATA_FILE])
    meta = read_meta(artifact_dir)
    for name in meta.files:
        if name not in sums:
            raise ArtifactError(
                f"{Path(artifact_dir) / name} is not listed in {SUMS_FILE}; the artifact is incomplete or altered"
            )
    return meta


__all__ = [
    "ArtifactMeta", "TensorSpec", "QuantizationInfo", "SourceInfo", "SCHEMA_VERSION", "METADATA_FILE",
    "SUMS_FILE", "METADATA_KEY", "write_meta", "read_meta", "write_sha256sums", "read_sha256sums",
    "verify_sha256sums", "load_verified_meta", "mask_dtype", "not_an_artifact",
]
