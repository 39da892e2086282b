"""TensorRT engine from our ONNX with the TensorRT Python builder (TensorRT 10 and 11).

* fp16: TensorRT 10 builds the fp32 ONNX with `BuilderFlag.FP16` (weak typing). TensorRT 11 removed
  the precision flags; there the ONNX is first converted to fp16 (float32 I/O kept) and built as a
  strongly typed network.
* int8: only from an explicit Q/DQ ONNX (a QAT export or our symmetric S8S8 PTQ) - TensorRT
  deprecated implicit calibration in 10.1 and removed it in 11 (DESIGN §6). Strongly typed where
  the flag exists, so the Q/DQ placement alone decides what runs in INT8.
* one optimization profile over the target's batch range [min, opt, max] per input.

Engines are specific to the TensorRT version and GPU; both go into the metadata, and engines are
built on the target device (Jetson), never shipped across versions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mirage_edge._deps import require
from mirage_edge.errors import ExportError
from mirage_edge.export.target import ExportTarget


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engine(onnx_path: Path, engine_path: Path, precision: str, input_shapes: dict[str, tuple[int, ...]],
                 target: ExportTarget, work_dir: Path) -> dict[str, Any]:
    """Build and serialize an engine; returns build facts (versions, GPU, flags) for metadata.

    input_shapes: input name -> (1, H, W) per-sample shape; the batch axis comes from target.batch.
    """
    trt = require("tensorrt", "TensorRT engine build")
    from mirage_edge.runtime.backends import check_cuda, gpu_name, load_cudart

    cudart = load_cudart()
    check_cuda(cudart.cudaSetDevice(int(target.tensorrt.device)), "cudaSetDevice")
    major = trt_major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    info: dict[str, Any] = {"tensorrt_version": trt.__version__, "gpu": gpu_name(target.tensorrt.device)}
    err, props = cudart.cudaGetDeviceProperties(int(target.tensorrt.device))
    check_cuda(err, "cudaGetDeviceProperties")
    info["compute_capability"] = f"{props.major}.{props.minor}"

    src = onnx_path
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and (
        precision == "int8" or major >= 11)
    if precision == "fp16" and major >= 11:
        from mirage_edge.export.onnx import convert_fp16

        src = work_dir / "trt_fp16.onnx"
        info.update(convert_fp16(onnx_path, src))
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    info["strongly_typed"] = bool(strongly_typed or major >= 11)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT cannot parse {src.name}: " + " | ".join(errors[:5]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(target.tensorrt.workspace_mb) << 20)
    config.builder_optimization_level = int(target.tensorrt.builder_optimization_level)
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        info["builder_flags"] = ["FP16"]
    elif precision == "int8" and not strongly_typed:
        # TensorRT 10.0 (no STRONGLY_TYPED): explicit Q/DQ still decides INT8; the flag only
        # enables INT8 kernels, no calibrator is set.
        config.set_flag(trt.BuilderFlag.INT8)
        info["builder_flags"] = ["INT8"]

    b = target.batch
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        per_sample = input_shapes[tensor.name]
        if b.dynamic:
            shapes = [(n, *per_sample) for n in (b.min, b.opt, b.max)]
        else:
            shapes = [(b.opt, *per_sample)] * 3
        profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    info["profile_batch"] = [b.min, b.opt, b.max] if b.dynamic else [b.opt] * 3

    if target.tensorrt.timing_cache:
        cache_path = Path(target.tensorrt.timing_cache)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {src.name} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    if target.tensorrt.timing_cache:
        Path(target.tensorrt.timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return info
