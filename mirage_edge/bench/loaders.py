"""Build runners from what a suite names: our checkpoint folders and registered models (PyTorch),
and exported artifact folders (torch-free runtime). Imports of torch / the runtime happen here,
inside the worker, never at bench import time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mirage_edge.bench.runners import NotApplicable, Runner, TorchRunner, dir_size_mb
from mirage_edge.errors import CheckpointError

# "encoder": features only (an exported or saved encoder): timed on any task, never scored
TASK_KIND = {"segmentation": "seg", "classification": "cls", "seg": "seg", "cls": "cls", "encoder": "encoder"}


class MirageTorchRunner(TorchRunner):
    """TorchRunner that can re-target a MIRAGE encoder's fixed positional tables to the timed size
    (`set_input_size`), and back to the evaluation size before scoring."""

    def set_input_size(self, height: int, width: int) -> None:
        enc = getattr(self.module, "encoder", self.module)
        if hasattr(enc, "set_input_size") and tuple(getattr(enc, "input_size", ())) != (height, width):
            enc.set_input_size((height, width))


def _preprocess_from_config(cfg: dict[str, Any], size: tuple[int, int] | None) -> Any:
    """The checkpoint's preprocessing spec (train stores it as meta.preprocessing, distill as
    meta.preprocess), else None (the row is then timed but not evaluated)."""
    from mirage_edge.data.preprocess import PreprocessSpec

    meta = cfg.get("meta") or {}
    for holder in (meta, cfg):
        spec = holder.get("preprocessing") or holder.get("preprocess")
        if isinstance(spec, dict):
            return PreprocessSpec.from_dict(spec.get("bscan", spec) if "size" not in spec else spec)
    return PreprocessSpec(size=tuple(size)) if size else None


def _resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a training run folder (its best/, else its latest checkpoint)."""
    if (path / "config.json").is_file() or (path / "qat.json").is_file():
        return path
    if path.is_dir():
        from mirage_edge.train.finetune import resolve_checkpoint

        resolved = Path(resolve_checkpoint(str(path)))
        if (resolved / "config.json").is_file():
            return resolved
    raise CheckpointError(f"checkpoint folder not found or incomplete: {path} (needs config.json + "
                          "model.safetensors, qat.json for a QAT student, or a run folder with best/)")


def checkpoint_config(source: str | Path) -> tuple[Path, bool, dict[str, Any]]:
    """(checkpoint folder, is a QAT student, its config.json) for a checkpoint or run folder; a QAT
    student's config is its fp32/ twin's, which holds the same meta."""
    path = _resolve_checkpoint(Path(source))
    qat = (path / "qat.json").is_file()
    cfg = json.loads(((path / "fp32") if qat else path).joinpath("config.json").read_text(encoding="utf-8"))
    return path, qat, cfg


def torch_runner(source: str, *, task_kind: str = "", num_classes: int | None = None,
                 input_size: int | None = None, device: str = "cpu", head: dict[str, Any] | None = None) -> Runner:
    """A checkpoint folder (trained weights; FP32 or QAT student; a run folder's best/) or a
    registered model name (seeded random weights + a fresh task head of `task_kind` with
    `num_classes` classes and `head` options, built for `input_size`: the same module, weights
    hash included, as the bench's own export of that name, `mirage_edge.bench.deploy`)."""
    path = Path(source)
    if path.exists() or "/" in source or source.startswith("."):
        path, qat, cfg = checkpoint_config(path)
        kind = TASK_KIND.get(cfg.get("kind", ""), "")
        classes = list((cfg.get("meta") or {}).get("classes") or [])

        def build() -> Any:
            if qat:
                from mirage_edge.distill import load_student

                return load_student(path)
            from mirage_edge.models.checkpoint import load_model

            return load_model(path)

        spec = _preprocess_from_config(cfg, None)
        runner = MirageTorchRunner(build, task_kind=kind, classes=classes, spec=spec, weights="trained",
                                   files=sorted(path.glob("*.safetensors")), device=device,
                                   notes="QAT fake-quant model in PyTorch" if qat else "")
        runner.base_model = str((cfg.get("meta") or {}).get("model_name") or path)
        return runner

    kind = task_kind or "cls"
    k = int(num_classes or 2)
    size = int(input_size or 512)

    def build_registry() -> Any:
        from mirage_edge.export.registered import registered_model

        task = "segmentation" if kind == "seg" else "classification"
        return registered_model(source, task=task, num_classes=k, head=head, random_weights=True,
                                input_size=(size, size), hash_weights=False).model

    runner = MirageTorchRunner(build_registry, task_kind=kind, classes=[str(i) for i in range(k)], spec=None,
                               weights="random", device=device, notes=f"random weights (seeded), "
                               f"{'ConvNeXt seg' if kind == 'seg' else 'linear'} head ({k} classes)")
    runner.base_model = source
    return runner


# ---------------------------------------------------------------------------------------------
# exported artifacts
# ---------------------------------------------------------------------------------------------

# runtimes that can execute each artifact format, preferred first
RUNTIMES = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",), "tensorrt": ("tensorrt",)}


class ArtifactRunner(Runner):
    """An exported artifact folder run by `mirage_edge.runtime.Predictor` (checksums verified on load).

    `backend` "auto" runs the format's preferred runtime, or the first runtime in `allowed` that can
    read the format (an ONNX file also runs on OpenVINO)."""

    def __init__(self, path: str | Path, backend: str = "auto", device: str = "cpu",
                 allowed: list[str] | None = None) -> None:
        from mirage_edge.artifact import read_meta

        self.path = Path(path)
        self.meta = read_meta(self.path)  # fails early (no metadata) -> error row at stage "load"
        self.requested = backend
        self.precision = self.meta.precision
        self.task_kind = TASK_KIND.get(self.meta.task, "")
        self.classes = list(self.meta.classes)
        runtimes = RUNTIMES[self.meta.format]
        if backend in ("", "auto"):
            usable = [b for b in runtimes if allowed is None or b in allowed]
            if not usable:
                raise NotApplicable(f"{self.meta.format} artifact, backends {allowed}")
            backend = usable[0]
        elif backend not in runtimes:
            raise NotApplicable(f"{self.meta.format} artifact cannot run on {backend}")
        self.backend = backend
        # TensorRT engines run on the GPU (device index from a "cuda:N" suite device); the rest on CPU
        index = device.split(":")[1] if device.startswith("cuda:") else "0"
        self.device = f"cuda:{index}" if backend == "tensorrt" else "cpu"
        self._runtime_device = index if backend == "tensorrt" else None
        q = self.meta.quantization
        self.notes = f"{self.meta.format} artifact" + (f", {q.method}" if q else "")
        out = self.meta.outputs[0]
        stride = int((self.meta.export_target or {}).get("seg_mask_stride", 1) or 1)
        self.output = f"mask@{stride}" if out.kind == "mask" else out.kind
        self.base_model = self.meta.source.model_name
        if "random" in str(self.meta.build.get("weights", "")):  # a registered model exported for timing
            self.weights = "random"
        self.quantized_share = q.quantized_share if q is not None and self.precision == "int8" else None
        if self.meta.format == "openvino" or backend == "openvino":
            hint = (self.meta.runtime.get("openvino") or {}).get("INFERENCE_PRECISION_HINT")
            self.notes += f", OpenVINO float ops in {hint or 'the plugin default (bf16 on avx512_bf16 CPUs)'}"
        self.predictor: Any = None
        self._spec = None

    def load(self, threads: int) -> None:
        from mirage_edge.runtime import Predictor

        self.close()
        self.predictor = Predictor.load(self.path, backend=self.backend, threads=threads,
                                        device=self._runtime_device)
        self.backend = self.predictor.backend

    def infer(self, x: np.ndarray) -> np.ndarray:
        # Predictor.run: the runtime's own call path (batch split/padding for fixed-batch models)
        return self.predictor.run(x)[self.meta.outputs[0].name]

    def preprocess_spec(self) -> Any:
        if self._spec is None:
            from mirage_edge.data.preprocess import PreprocessSpec

            self._spec = PreprocessSpec.from_dict(self.meta.preprocessing[self.meta.inputs[0].name])
        return self._spec

    def fixed_input(self) -> tuple[int | None, int | None, int | None]:
        """Any batch (the runtime splits/pads); the preprocessing size unless the graph is dynamic in H and
        W (`export --set dynamic_hw=true`): such an artifact is timed at the suite's sizes like a
        checkpoint, so a student trained at the B-scan's aspect is timed at the reference's 512 x 512
        from the very file it ships in (accuracy is still taken at its preprocessing size)."""
        if self.meta.inputs[0].dynamic_hw:
            return (None, None, None)
        h, w = self.preprocess_spec().size
        return (None, int(h), int(w))

    def file_size_mb(self) -> float | None:
        return dir_size_mb(self.path, self.meta.files)

    def close(self) -> None:
        self.predictor = None


def artifact_runner(path: str, backend: str = "auto", device: str = "cpu", allowed: list[str] | None = None) -> Runner:
    return ArtifactRunner(path, backend=backend, device=device, allowed=allowed)


__all__ = ["torch_runner", "artifact_runner", "ArtifactRunner", "MirageTorchRunner", "RUNTIMES"]
