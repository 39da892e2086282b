"""Runners: one interface over everything the bench can time and evaluate.

A `Runner` loads a model in one form with a thread count, reports its fixed input dims, and maps a
preprocessed float32 batch (B x 1 x H x W in [0, 1]) to logits (B x K for classification, B x K x H x
W for segmentation). `TorchRunner` wraps an `nn.Module` (our checkpoints, registered models with
random weights); `ArtifactRunner` runs an exported folder through the torch-free runtime (the
exact artifact a device ships); a suite `factory` can return any other `Runner`.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mirage_edge.errors import ConfigError, MirageEdgeError


class NotApplicable(Exception):
    """A model form cannot run on the requested backend (e.g. an OpenVINO IR on ONNX Runtime): the
    combination is left out of the table, it is not an error."""


class Runner:
    """Base class. Subclasses set the class attributes and implement `load` and `infer`."""

    backend: str = ""
    precision: str = "fp32"
    device: str = "cpu"
    weights: str = "trained"        # "random": latency-only row, never evaluated
    task_kind: str = ""             # "cls" | "seg" | "encoder" (latency only) | "" (unknown)
    classes: list[str] = []
    notes: str = ""
    quantized_share: float | None = None  # int8 artifacts: from their metadata (counted in the file)
    # what one call returns (the output contract compared across rows): "logits" (B x K [x H x W]
    # float), "mask@S" (B x H x W class mask, argmax at stride S), "features", "" unknown
    output: str = ""
    base_model: str = ""            # the registered model / checkpoint behind the row (groups deployments)

    def load(self, threads: int) -> None:
        """(Re)build the model/session using `threads` threads. Timed as the row's load time."""
        raise NotImplementedError

    def infer(self, x: np.ndarray) -> np.ndarray:
        """B x 1 x H x W float32 -> logits (B x K or B x K x H x W) as a numpy array."""
        raise NotImplementedError

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Raw grey H x W image -> 1 x H' x W' float32 with this model's own preprocessing spec."""
        from mirage_edge.data.preprocess import preprocess

        spec = self.preprocess_spec()
        if spec is None:
            raise MirageEdgeError(f"{type(self).__name__} has no preprocessing spec; cannot evaluate")
        return preprocess(image, spec)

    def preprocess_spec(self) -> Any:
        return None

    def fixed_input(self) -> tuple[int | None, int | None, int | None]:
        """(batch, height, width) the model is fixed to; None for a dynamic axis."""
        return (None, None, None)

    def set_input_size(self, height: int, width: int) -> None:
        """Prepare the loaded model for H x W inputs (e.g. rebuild fixed positional tables)."""

    def file_size_mb(self) -> float | None:
        return None

    def params_m(self) -> float | None:
        return None

    def gflops(self, height: int, width: int) -> float | None:
        """2 x MACs for one B x 1 x height x width image at batch 1."""
        return None

    def close(self) -> None:
        """Drop the model so the next `load` starts from a clean slate."""


def dir_size_mb(path: str | Path, files: list[str] | None = None) -> float:
    """Size of a file, of `files` inside a folder, or of every model file of a folder, in MB."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size / 2**20
    names = [p / f for f in files] if files else [q for q in p.rglob("*") if q.is_file()]
    return sum(q.stat().st_size for q in names if q.is_file()) / 2**20


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------

class TorchRunner(Runner):
    """An `nn.Module` taking B x 1 x H x W, run eagerly in fp32 under `torch.inference_mode`.

    `build()` returns the module (called on every `load`, so load time includes construction and
    weight loading). `files` are the weight files counted as the row's size.
    """

    backend = "torch"

    def __init__(self, build: Callable[[], Any], *, task_kind: str = "", classes: list[str] | None = None,
                 spec: Any = None, weights: str = "trained", files: list[Path] | None = None,
                 input_size: tuple[int, int] | None = None, notes: str = "", device: str = "cpu") -> None:
        self._build = build
        self.device = device
        self.task_kind = task_kind
        self.classes = list(classes or [])
        self._spec = spec
        self.weights = weights
        self._files = list(files or [])
        self._input_size = input_size
        self.notes = notes
        self.output = {"seg": "logits", "cls": "logits", "encoder": "features"}.get(task_kind, "")
        self.module: Any = None

    def load(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.close()
        self.module = self._build().eval().to(self.device)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Host array in, host array out: on CUDA the copies (and the implied synchronisation) are timed."""
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device))
        if isinstance(out, dict):  # some heads return {"logits": ...}
            out = out.get("logits", next(iter(out.values())))
        return out.float().cpu().numpy()

    def preprocess_spec(self) -> Any:
        return self._spec

    def file_size_mb(self) -> float | None:
        files = [f for f in self._files if Path(f).is_file()]
        return sum(Path(f).stat().st_size for f in files) / 2**20 if files else None

    def params_m(self) -> float | None:
        return None if self.module is None else sum(p.numel() for p in self.module.parameters()) / 1e6

    def gflops(self, height: int, width: int) -> float | None:
        return None if self.module is None else torch_gflops(self.module, height, width)

    def close(self) -> None:
        self.module = None


def torch_gflops(module: Any, height: int, width: int) -> float | None:
    """FLOPs (2 x MACs of matmul/conv/bmm) of one 1 x 1 x H x W forward, with torch's FlopCounterMode.

    FlopCounterMode does not count the fused CPU kernel of `scaled_dot_product_attention` (0 FLOPs),
    so counting runs with SDPA forced to its math backend (explicit matmuls) and timm modules'
    `fused_attn` switched off. Returns None if the forward fails at this size.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    switched = [m for m in module.modules() if getattr(m, "fused_attn", None) is True]
    for m in switched:
        m.fused_attn = False
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        x = torch.zeros(1, 1, height, width, device=device)
        with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            module(x)
        return counter.get_total_flops() / 1e9
    except Exception:  # noqa: BLE001 - FLOPs are optional; the timing row reports real failures
        return None
    finally:
        for m in switched:
            m.fused_attn = True


# ---------------------------------------------------------------------------------------------
# factory ("module:function")
# ---------------------------------------------------------------------------------------------

def load_factory(ref: str) -> Callable[..., Runner]:
    """Resolve "package.module:function" (a suite's `factory`)."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"factory {ref!r} must look like 'package.module:function'")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import factory {ref!r}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"factory {ref!r} is not callable")
    return obj


# ---------------------------------------------------------------------------------------------
# what a row times
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TimedCalls:
    """The calls one row times, interleaved call by call (`timing.measure_interleaved`).

    `row` gives the row's latency. For an artifact it is its engine on a model compiled for the row's
    fixed input shape, with one reused infer request: each call copies the input into the request's
    own tensor and the output back to numpy (what an application feeding new images pays). `engine`
    is the same request run on its already-bound input, no copies: what OpenVINO's `benchmark_app`
    reports. `runtime` is the mirage-edge runtime's `Predictor.run` (the call path of `mirage-edge
    predict`). Either may be None where it does not apply (PyTorch rows, TensorRT).
    """

    row: Callable[[], object]
    engine: Callable[[], object] | None = None
    runtime: Callable[[], object] | None = None
    what: str = ""

    def fns(self) -> dict[str, Callable[[], object]]:
        return {name: fn for name, fn in (("row", self.row), ("engine", self.engine), ("runtime", self.runtime))
                if fn is not None}


def timed_calls(runner: Runner, x: np.ndarray, threads: int) -> TimedCalls:
    """The calls to time for `runner` on input `x` (B x 1 x H x W float32) with `threads` threads.

    OpenVINO: the runtime compiles the artifact with a dynamic batch axis; on the CPU plugin every
    call then re-infers shapes and, when a new input array is passed, re-allocates the input, which
    cost a small model 6-14 % per call (measured, see benchmarks/README.md "Cross-check"). A device
    runs one batch size, so the row times a model reshaped to the row's batch, compiled with the same
    properties as the runtime (the artifact's hints, `threads` threads), and `runtime` keeps the
    runtime's own call path beside it. ONNX Runtime: the session's `run` (no reshape needed).
    """
    predictor = getattr(runner, "predictor", None)
    engine = getattr(predictor, "engine", None)
    if predictor is None or engine is None:
        return TimedCalls(row=lambda: runner.infer(x), what=f"{runner.backend or 'model'} call")
    name = predictor.meta.input_names[0]
    out_name = predictor.meta.outputs[0].name
    runtime = lambda: predictor.run(x)[out_name]  # noqa: E731 - the runtime's call path, as the bench ran it before
    if len(predictor.meta.input_names) != 1 or not _batch_fits(predictor, x.shape[0]):
        return TimedCalls(row=runtime, what=f"{engine.name} via Predictor.run (no fixed-shape path for this batch)")
    if engine.name == "openvino":
        return _openvino_calls(predictor, x, threads, runtime)
    if engine.name == "onnxruntime":
        session, feeds = engine.session, {name: x}
        return TimedCalls(row=lambda: session.run([out_name], feeds)[0], runtime=runtime,
                          what="onnxruntime session.run (output copied out)")
    return TimedCalls(row=runtime, what=f"{engine.name} via Predictor.run")


def _batch_fits(predictor: Any, batch: int) -> bool:
    """Does one engine call take `batch` images (no split or padding by the runtime)?"""
    spec = predictor.meta.inputs[0]
    if "0" not in spec.dynamic_axes:
        return int(spec.shape[0]) == batch
    return len(spec.batch_range) != 2 or spec.batch_range[0] <= batch <= spec.batch_range[1]


def _openvino_calls(predictor: Any, x: np.ndarray, threads: int, runtime: Callable[[], object]) -> TimedCalls:
    import openvino as ov

    from mirage_edge.runtime.backends import model_file

    meta = predictor.meta
    core = ov.Core()
    model = core.read_model(str(model_file(predictor.artifact_dir, meta.format, meta.files)))
    model.reshape({meta.input_names[0]: list(x.shape)})
    # the runtime's own properties (OpenVinoBackend): the artifact's hints and the thread count
    config = {k: str(v) for k, v in (meta.runtime.get("openvino") or {}).items() if str(v) != "default"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    src = np.ascontiguousarray(x)
    dst = request.get_input_tensor(0).data

    def row() -> np.ndarray:
        dst[...] = src
        request.infer()
        return np.array(request.get_output_tensor(0).data, copy=True)

    row()  # binds the input once, so `engine` runs on real data
    batch = x.shape[0]
    return TimedCalls(row=row, engine=request.infer, runtime=runtime,
                      what=f"openvino, model reshaped to batch {batch}, one reused infer request, input copied in, "
                           "output copied out")


def make_input(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic B x 1 x H x W float32 input in [0, 1] for latency (dense compute ignores content)."""
    rng = np.random.default_rng(seed)
    return rng.random((batch, 1, height, width), dtype=np.float32)


def cpu_threads_env(threads: int, omp_wait_policy: str = "") -> dict[str, str]:
    """Environment for a worker process using `threads` threads (read when the libraries load)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


__all__ = ["NotApplicable", "Runner", "TorchRunner", "TimedCalls", "timed_calls", "torch_gflops", "load_factory",
           "make_input", "dir_size_mb", "cpu_threads_env"]
