"""Inference engines behind the Predictor (torch-free): ONNX Runtime, OpenVINO, TensorRT.

Each backend takes already-preprocessed float32 arrays {input name: N x 1 x H x W} and returns
{output name: array}. All three are safe to call from several threads: an ORT session's `run`
is thread-safe; OpenVINO gets one infer request per concurrent caller from a pool (one pool per
input shape); TensorRT runs one execution context under a lock.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
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
    """OpenVINO compiled model; `hints` are plugin properties (e.g. INFERENCE_PRECISION_HINT=f32).

    Exported models keep a dynamic batch axis (? x 1 x H x W). Run as is, the CPU plugin re-infers
    shapes on every call and re-allocates the input whenever a new array is passed: +11-14 % per
    call on a small INT8 student (benchmarks/README.md, "Cross-check"). So each input shape seen gets
    its own copy of the model reshaped to that shape and compiled with the same properties, and its
    infer requests are reused: a call copies the input into the request's own tensor and the output
    out. At most `max_shapes` compiled shapes are kept (least recently used dropped first); batch
    `max(1, lower bound)` is compiled at load, so a broken file or device fails there.
    """

    name = "openvino"

    def __init__(self, path: str | Path, device: str = "CPU", threads: int | None = None,
                 hints: dict[str, Any] | None = None, max_shapes: int = 4) -> None:
        ov = require("openvino", "running OpenVINO artifacts")
        if max_shapes < 1:
            raise MirageEdgeError(f"max_shapes must be >= 1, got {max_shapes}")
        self._ov = ov
        self._core = ov.Core()
        self._device = device
        self._path = Path(path)
        self._config = {k: str(v) for k, v in (hints or {}).items() if str(v) != "default"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = str(int(threads))
        self.max_shapes = int(max_shapes)
        try:
            self._model = self._core.read_model(str(path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
            raise ArtifactError(f"OpenVINO cannot load {path} on {device}: {exc}") from exc
        self.input_names = [p.get_any_name() for p in self._model.inputs]
        self.output_names = [p.get_any_name() for p in self._model.outputs]
        self._partial = [p.get_partial_shape() for p in self._model.inputs]
        # shape key -> (compiled model, pool of its idle infer requests); guarded by _lock
        self._cache: OrderedDict[tuple, tuple[Any, queue.SimpleQueue]] = OrderedDict()
        self._lock = threading.Lock()
        self._compile_lock = threading.Lock()  # reshaping clones of one ov.Model is not thread-safe
        first = self._load_shape()
        self.compiled = self._entry(first)[0] if first is not None else self._compile(None)
        self.version = ov.get_version()

    def _load_shape(self) -> tuple | None:
        """The shape key compiled at load: batch axis at max(1, its lower bound); None when another
        axis is dynamic (then only the calls' shapes are compiled)."""
        key = []
        for ps in self._partial:
            if ps.rank.is_dynamic or any(ps[i].is_dynamic for i in range(1, len(ps))):
                return None
            dims = [d.get_length() if d.is_static else None for d in ps]
            if dims[0] is None:
                dims[0] = max(1, ps[0].get_min_length())
            key.append(tuple(dims))
        return tuple(key)

    def _compile(self, key: tuple | None) -> Any:
        """Compile the model reshaped to `key` (one shape per input; None: as exported)."""
        with self._compile_lock:
            try:
                model = self._model
                if key is not None and any(ps.is_dynamic for ps in self._partial):
                    model = self._model.clone()
                    model.reshape({i: self._ov.PartialShape(list(shape)) for i, shape in enumerate(key)})
                return self._core.compile_model(model, self._device, self._config)
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
                what = "" if key is None else f" for input shapes {[list(k) for k in key]}"
                raise ArtifactError(f"OpenVINO cannot compile {self._path} on {self._device}{what}: {exc}") from exc

    def _entry(self, key: tuple) -> tuple[Any, queue.SimpleQueue]:
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                return entry
        compiled = self._compile(key)  # outside _lock: calls on shapes already compiled go on meanwhile
        with self._lock:
            entry = self._cache.setdefault(key, (compiled, queue.SimpleQueue()))
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_shapes:
                # a caller still holding an evicted entry finishes with it; only the cache lets go
                self._cache.popitem(last=False)
            return entry

    def cached_shapes(self) -> list[tuple]:
        """Shape keys compiled now (one tuple of input shapes each), least recently used first."""
        with self._lock:
            return list(self._cache)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [feeds[name] for name in self.input_names]
        key = tuple(tuple(int(d) for d in a.shape) for a in arrays)
        for name, ps, shape in zip(self.input_names, self._partial, key):
            if not ps.compatible(self._ov.PartialShape(list(shape))):
                raise MirageEdgeError(f"{self._path}: input {name} of shape {list(shape)} does not fit the "
                                      f"model's {ps}")
        compiled, pool = self._entry(key)
        try:
            req = pool.get_nowait()
        except queue.Empty:
            req = compiled.create_infer_request()
        try:
            for i, a in enumerate(arrays):
                req.get_input_tensor(i).data[...] = a
            req.infer()
            return {name: np.array(req.get_output_tensor(i).data, copy=True)
                    for i, name in enumerate(self.output_names)}
        finally:
            pool.put(req)


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
