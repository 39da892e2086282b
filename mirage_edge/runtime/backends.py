"""Inference engines behind the Predictor (torch-free): ONNX Runtime, OpenVINO, TensorRT.

Each backend takes already-preprocessed float32 arrays {input name: N x 1 x H x W} and returns
{output name: array}. All three are safe to call from several threads: an ORT session's `run`
is thread-safe; OpenVINO gets one infer request per concurrent caller from a pool; TensorRT runs
one execution context under a lock.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mirage_edge._deps import require
from mirage_edge.errors import ArtifactError, MirageEdgeError

BACKENDS = ("onnxruntime", "openvino", "tensorrt")


class Backend:
    name = "base"
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session (CPU by default; `providers` for CUDA/TensorRT/OpenVINO EPs)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        ort = require("onnxruntime", "running ONNX artifacts")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        for key, value in (options or {}).items():
            so.add_session_config_entry(str(key), str(value))
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.version = ort.__version__

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))


class OpenVinoBackend(Backend):
    """OpenVINO compiled model; `hints` are plugin properties (e.g. INFERENCE_PRECISION_HINT=f32)."""

    name = "openvino"

    def __init__(self, path: str | Path, device: str = "CPU", threads: int | None = None,
                 hints: dict[str, Any] | None = None) -> None:
        ov = require("openvino", "running OpenVINO artifacts")
        core = ov.Core()
        config = {k: str(v) for k, v in (hints or {}).items() if str(v) != "default"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
            raise ArtifactError(f"OpenVINO cannot load {path} on {device}: {exc}") from exc
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self.version = ov.get_version()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            req = self._pool.get_nowait()
        except queue.Empty:
            req = self.compiled.create_infer_request()
        try:
            req.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
            return {name: np.array(req.get_output_tensor(i).data, copy=True)
                    for i, name in enumerate(self.output_names)}
        finally:
            self._pool.put(req)


class TensorRTBackend(Backend):
    """A serialized TensorRT engine run with the name-based I/O API (TensorRT >= 10).

    Device memory is managed with cuda-python (`cuda.bindings.runtime`), not torch. One execution
    context, guarded by a lock: TensorRT contexts are not re-entrant.
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, device: int = 0) -> None:
        trt = require("tensorrt", "running TensorRT engines")
        self._cudart = load_cudart()
        check_cuda(self._cudart.cudaSetDevice(int(device)), "cudaSetDevice")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise ArtifactError(
                f"TensorRT {trt.__version__} cannot deserialize {path}; engines only load with the TensorRT "
                "version and GPU they were built on - rebuild it on this device with `mirage-edge export`"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        err, self._stream = self._cudart.cudaStreamCreate()
        check_cuda(err, "cudaStreamCreate")
        self._lock = threading.Lock()
        self.version = trt.__version__

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        kind = cudart.cudaMemcpyKind
        with self._lock:
            ptrs: list[int] = []
            try:
                for name in self.input_names:
                    host = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                    if not self.context.set_input_shape(name, tuple(host.shape)):
                        raise MirageEdgeError(f"input {name} shape {host.shape} is outside the engine's profile")
                    ptr = self._malloc(host.nbytes)
                    ptrs.append(ptr)
                    check_cuda(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                                  kind.cudaMemcpyHostToDevice, self._stream)[0], "cudaMemcpyAsync")
                    self.context.set_tensor_address(name, ptr)
                hosts = {}
                for name in self.output_names:
                    shape = tuple(self.context.get_tensor_shape(name))
                    host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                    ptr = self._malloc(max(host.nbytes, 1))
                    ptrs.append(ptr)
                    self.context.set_tensor_address(name, ptr)
                    hosts[name] = (host, ptr)
                if not self.context.execute_async_v3(self._stream):
                    raise MirageEdgeError("TensorRT execute_async_v3 failed")
                for host, ptr in hosts.values():
                    check_cuda(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                                  kind.cudaMemcpyDeviceToHost, self._stream)[0], "cudaMemcpyAsync")
                check_cuda(cudart.cudaStreamSynchronize(self._stream)[0], "cudaStreamSynchronize")
                return {name: host for name, (host, _) in hosts.items()}
            finally:
                for ptr in ptrs:
                    cudart.cudaFree(ptr)

    def _malloc(self, nbytes: int) -> int:
        err, ptr = self._cudart.cudaMalloc(nbytes)
        check_cuda(err, "cudaMalloc")
        return int(ptr)


def load_cudart() -> Any:
    """The cuda-python runtime module (`cudart`), new or old package layout; names the extra if missing."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as exc:
            from mirage_edge.errors import MissingDependencyError

            raise MissingDependencyError(
                "cuda-python is not installed (needed to run TensorRT engines without torch): "
                'pip install "mirage-edge[tensorrt]"'
            ) from exc
    return cudart


def check_cuda(err: Any, what: str) -> None:
    """Raise MirageEdgeError unless a cudart call returned cudaSuccess (`err`: the code or a result tuple)."""
    code = err[0] if isinstance(err, tuple) else err
    if int(getattr(code, "value", code)) != 0:  # cudaError_t enum; 0 = cudaSuccess
        raise MirageEdgeError(f"CUDA call {what} failed: {code}")


def gpu_name(device: int = 0) -> str:
    """Name of CUDA device `device` (for artifact metadata)."""
    cudart = load_cudart()
    err, props = cudart.cudaGetDeviceProperties(int(device))
    check_cuda(err, "cudaGetDeviceProperties")
    name = props.name
    return name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)


def model_file(artifact_dir: Path, fmt: str, files: list[str]) -> Path:
    """The file a backend opens for an artifact of format `fmt`."""
    suffix = {"onnx": ".onnx", "openvino": ".xml", "tensorrt": ".engine"}[fmt]
    for f in files:
        if f.endswith(suffix):
            return artifact_dir / f
    raise ArtifactError(f"{artifact_dir}: no {suffix} file among {files}")


def open_backend(path: Path, fmt: str, backend: str = "auto", *, threads: int | None = None,
                 runtime_hints: dict[str, dict[str, Any]] | None = None, device: str | None = None) -> Backend:
    """Open the model file `path` (artifact format `fmt`) with `backend` ("auto" picks by format)."""
    from mirage_edge._deps import has

    hints = runtime_hints or {}
    if backend == "auto":
        backend = {"onnx": "onnxruntime" if has("onnxruntime") else "openvino",
                   "openvino": "openvino", "tensorrt": "tensorrt"}[fmt]
    if backend not in BACKENDS:
        raise MirageEdgeError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    if backend == "tensorrt" and fmt != "tensorrt":
        raise ArtifactError(f"a {fmt} artifact cannot run on the tensorrt backend; export with format tensorrt")
    if fmt == "tensorrt" and backend != "tensorrt":
        raise ArtifactError("a TensorRT engine runs only on the tensorrt backend")
    if fmt == "openvino" and backend != "openvino":
        raise ArtifactError("an OpenVINO IR runs only on the openvino backend")
    if backend == "onnxruntime":
        ort_hints = dict(hints.get("onnxruntime", {}))
        providers = ort_hints.pop("providers", None)
        return OnnxRuntimeBackend(path, threads=threads, providers=providers, options=ort_hints)
    if backend == "openvino":
        return OpenVinoBackend(path, device=device or "CPU", threads=threads, hints=hints.get("openvino", {}))
    return TensorRTBackend(path, device=int(device or hints.get("tensorrt", {}).get("device", 0)))
