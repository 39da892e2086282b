"""Export settings as data: `ExportTarget` (loaded strictly from export/targets/*.toml), torch-free.

A target names the backend(s) and precision(s), the input shape policy, the quantization recipe and
the validation thresholds. The resolved target is stored in every artifact's metadata, so an
artifact says exactly how it was made (DESIGN §4.6).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from mirage_edge import config as _config
from mirage_edge.errors import ConfigError

FORMATS = ("onnx", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
ONNX_RUNTIMES = ("onnxruntime", "openvino", "opencv")  # what an ONNX artifact is checked in


@dataclass
class BatchConfig:
    """Batch axis policy. `dynamic` exports a symbolic batch axis; min/opt/max feed TensorRT profiles."""

    dynamic: bool = True
    min: int = 1
    opt: int = 1
    max: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass
class QuantConfig:
    """INT8 recipe.

    method: "auto" (QAT graph if the model is fake-quantized, else the backend's PTQ), "ort"
    (ONNX Runtime static QDQ), "nncf" (NNCF PTQ), "qat" (require a fake-quantized model).
    Defaults follow DESIGN §6: only MatMul/Gemm/Conv quantized, U8S8, per-channel weights.
    """

    method: Literal["auto", "ort", "nncf", "qat"] = "auto"
    calib_images: int = 32
    op_types: list[str] = field(default_factory=lambda: ["MatMul", "Gemm", "Conv"])
    activation_type: Literal["QUInt8", "QInt8"] = "QUInt8"
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    per_channel: bool = True
    # TensorRT needs symmetric signed activations (zero point 0); the TRT targets set this.
    symmetric_activations: bool = False
    calibration_method: Literal["MinMax", "Entropy", "Percentile"] = "MinMax"
    # NNCF: "auto" picks TRANSFORMER when the model has attention; ignored_scope = node-name regexes
    model_type: Literal["auto", "transformer", "default"] = "auto"
    ignored_patterns: list[str] = field(default_factory=list)
    # NNCF bias correction after quantization (AdvancedQuantizationParameters.disable_bias_correction
    # = not bias_correction); fast_bias_correction picks NNCF's fast variant over the full one.
    bias_correction: bool = True
    fast_bias_correction: bool = True
    # NNCF SmoothQuant, applied with the transformer model type only (NNCF 3.4
    # AdvancedSmoothQuantParameters): alpha per op type, < 0 = off. NNCF's defaults: MatMul 0.95,
    # Convolution off (MIRAGE's only conv is the patch embedding).
    smooth_quant_matmul: float = 0.95
    smooth_quant_convolution: float = -1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calib_images < 1:
            raise ValueError(f"quantization.calib_images must be >= 1, got {self.calib_images}")
        for key in ("smooth_quant_matmul", "smooth_quant_convolution"):
            if getattr(self, key) > 1:
                raise ValueError(f"quantization.{key} must be <= 1 (a negative value switches it off), "
                                 f"got {getattr(self, key)}")


@dataclass
class OpenVinoConfig:
    device: str = "CPU"
    # Precision the CPU plugin computes the float ops of fp16/INT8 artifacts in ("fp32" artifacts always
    # run f32). "f32" keeps parity with torch; the plugin default on avx512_bf16 CPUs is bf16 (faster,
    # cos >= 0.9999 in our baseline).
    inference_precision: Literal["f32", "bf16", "f16", "default"] = "f32"


@dataclass
class TensorRTConfig:
    device: int = 0
    workspace_mb: int = 2048
    builder_optimization_level: int = 3
    timing_cache: str = ""

    def __post_init__(self) -> None:
        if self.device < 0 or self.workspace_mb < 1 or not 0 <= self.builder_optimization_level <= 5:
            raise ValueError(f"tensorrt needs device >= 0, workspace_mb >= 1 and builder_optimization_level "
                             f"0..5, got {self.device}/{self.workspace_mb}/{self.builder_optimization_level}")


@dataclass
class ValidationConfig:
    """Parity thresholds checked before an artifact is written (failure -> ValidationError)."""

    n_inputs: int = 8
    fp32_max_abs: float = 1e-3
    fp32_min_cosine: float = 0.9999
    fp16_max_abs: float = 5e-2
    fp16_min_cosine: float = 0.999
    int8_min_top1_agreement: float = 0.9  # classification
    int8_min_dice: float = 0.9  # segmentation, prediction Dice vs torch fp32
    int8_min_cosine: float = 0.98  # encoders (features); also reported for the other tasks
    max_metric_drop: float = 0.05  # when labels exist: torch metric - artifact metric
    # INT8 artifacts: share of compute ops (conv/matmul/gemm) fed by quantized inputs in the written
    # file. 0 would be an FP32 graph under an INT8 label; heads or attention matmuls kept in float
    # by a recipe lower it, a share under this fails the export.
    int8_min_quantized_share: float = 0.5
    # ONNX artifacts must load, run and match torch (same thresholds) in each of these runtimes,
    # else the export fails; the others are tried and recorded in parity["runtimes"].
    onnx_runtimes: list[str] = field(default_factory=lambda: list(ONNX_RUNTIMES))
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.n_inputs < 1:
            raise ValueError(f"validation.n_inputs must be >= 1, got {self.n_inputs}")
        bad = [r for r in self.onnx_runtimes if r not in ONNX_RUNTIMES]
        if bad:
            raise ValueError(f"unknown runtime(s) {bad} in validation.onnx_runtimes "
                             f"(allowed: {', '.join(ONNX_RUNTIMES)})")


@dataclass
class ExportTarget:
    """One deployment target: which artifacts to build from a model and how to check them."""

    name: str = "custom"
    description: str = ""
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    task: Literal["auto", "encoder", "classification", "segmentation"] = "auto"
    # [H, W] of the exported input; empty = the model's own input size
    input_size: list[int] = field(default_factory=list)
    dynamic_hw: bool = False
    # segmentation: put argmax in the graph (output "mask", B x H x W, artifact.mask_dtype) instead of logits
    seg_argmax: bool = False
    # with seg_argmax: take the argmax at H/stride x W/stride and repeat each label stride x stride
    # (SegmentationModel.forward_mask); 1 = argmax of full-size logits. Validation measures the cost.
    seg_mask_stride: int = 1
    opset: int = 18
    simplify: bool = True
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    modalities: list[str] = field(default_factory=list)  # empty = from the model (default ["bscan"])
    batch: BatchConfig = field(default_factory=BatchConfig)
    quantization: QuantConfig = field(default_factory=QuantConfig)
    openvino: OpenVinoConfig = field(default_factory=OpenVinoConfig)
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # overrides for mirage_edge.data.preprocess.PreprocessSpec (size is set from input_size)
    preprocess: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.formats:
            if f not in FORMATS:
                raise ValueError(f"unknown format {f!r} in formats (allowed: {', '.join(FORMATS)})")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise ValueError(f"unknown precision {p!r} in precisions (allowed: {', '.join(PRECISIONS)})")
        if not self.formats or not self.precisions:
            raise ValueError("formats and precisions must not be empty")
        if self.input_size and (len(self.input_size) != 2 or min(self.input_size) < 1):
            raise ValueError(f"input_size must be [H, W] with H, W >= 1, got {self.input_size}")
        if self.seg_mask_stride < 1:
            raise ValueError(f"seg_mask_stride must be >= 1, got {self.seg_mask_stride}")
        if self.opset < 17:
            raise ValueError(f"opset must be >= 17, got {self.opset}")
        if self.dynamic_hw and "tensorrt" in self.formats:
            raise ValueError("dynamic_hw cannot be used with tensorrt: an engine is built for one H x W "
                             "(its optimization profile covers the batch axis only); export each size with input_size")

    def to_dict(self) -> dict[str, Any]:
        return _config.to_dict(self)

    def combos(self) -> list[tuple[str, str]]:
        """(format, precision) pairs this target builds, in file order."""
        return [(f, p) for f in self.formats for p in self.precisions]


def load_target(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> ExportTarget:
    """Load an `ExportTarget` from TOML/JSON (strict), with `key=value` overrides on top.

    A bare name ("cpu-openvino-int8") is looked up in the repository's export/targets/; a target file
    may `extends` another (`mirage_edge.config.read_config`).
    """
    if path is not None:
        found = _config.find_config(path, [TARGETS_DIR])
        if found is None:
            known = ", ".join(_config.curated_names([TARGETS_DIR]))
            raise ConfigError(f"export target not found: {path}"
                              + (f" (curated targets: {known})" if known else ""))
        path = found
    return _config.load(ExportTarget, path, overrides, base=base, curated=[TARGETS_DIR])


# export/targets/ next to the package in a source checkout
TARGETS_DIR = Path(__file__).resolve().parents[2] / "export" / "targets"

__all__ = ["ExportTarget", "BatchConfig", "QuantConfig", "OpenVinoConfig", "TensorRTConfig",
           "ValidationConfig", "load_target", "FORMATS", "PRECISIONS", "TARGETS_DIR"]
