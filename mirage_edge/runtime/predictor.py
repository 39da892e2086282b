"""Torch-free `Predictor`: an exported artifact + its metadata -> predictions on raw OCT B-scans.

    p = Predictor.load("artifacts/openvino-int8")          # verifies SHA256SUMS first
    probs = p.predict(bscan)                               # H x W           -> K probabilities
    masks = p.predict(volume)                              # N x H x W       -> N x H' x W' class ids
    probs = p.predict(["a.png", "b.png"])                  # files (a volume) -> N x K

Preprocessing is the artifact's own spec applied by `mirage_edge.data.preprocess` (the one
implementation, shared with training), so the runtime reproduces the torch pipeline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from mirage_edge.artifact import ArtifactMeta, load_verified_meta, mask_dtype, read_meta
from mirage_edge.data.io import read_image
from mirage_edge.data.preprocess import PreprocessSpec, preprocess
from mirage_edge.errors import InputError
from mirage_edge.runtime.backends import Backend, model_file, open_backend

ImageLike = Union[np.ndarray, str, Path]
Images = Union[ImageLike, Sequence[ImageLike], Mapping[str, Any]]
_DTYPES = (np.uint8, np.uint16, np.float32, np.float64, np.float16)


class Predictor:
    """Runs one artifact. Thread-safe: concurrent `predict` calls share the loaded model."""

    def __init__(self, artifact_dir: Path, meta: ArtifactMeta, backend: Backend) -> None:
        self.artifact_dir = artifact_dir
        self.meta = meta
        self.engine = backend
        self.specs = {name: PreprocessSpec.from_dict(meta.preprocessing[name], source=f"{artifact_dir} metadata")
                      for name in meta.input_names}
        self._dynamic_hw = {t.name for t in meta.inputs if t.dynamic_hw}  # these take any H x W in `run`
        missing = [n for n in meta.input_names if n not in backend.input_names]
        if missing:
            from mirage_edge.errors import ArtifactError

            raise ArtifactError(f"{artifact_dir}: model inputs {backend.input_names} do not include {missing} "
                                "named in metadata.json")
        spec0 = meta.inputs[0]
        dynamic = "0" in spec0.dynamic_axes
        self._fixed_batch = None if dynamic else int(spec0.shape[0])
        self._max_batch = (spec0.batch_range[1] if dynamic and len(spec0.batch_range) == 2 else None)

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "auto", *, threads: int | None = None,
             device: str | None = None, verify: bool = True) -> "Predictor":
        """Open an artifact folder. `backend`: auto | onnxruntime | openvino | tensorrt.

        With `verify` (default) every file is checked against SHA256SUMS first; a corrupted or
        tampered file raises `ArtifactError` naming it. `threads`: engine threads (None or 0: its default).
        """
        if threads is not None and threads < 0:
            from mirage_edge.errors import ConfigError

            raise ConfigError(f"threads must be >= 0 (0 = the engine's default), got {threads}")
        d = Path(artifact_dir)
        meta = load_verified_meta(d) if verify else read_meta(d)
        engine = open_backend(model_file(d, meta.format, meta.files), meta.format, backend, threads=threads,
                              runtime_hints=meta.runtime, device=device)
        return cls(d, meta, engine)

    # ------------------------------------------------------------------------ properties
    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.specs[self.meta.input_names[0]].size)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"Predictor({self.artifact_dir}, task={self.task}, {self.meta.format}/{self.meta.precision}, "
                f"backend={self.backend})")

    # ------------------------------------------------------------------------ inputs
    def preprocess(self, images: Images) -> tuple[dict[str, np.ndarray], bool]:
        """Raw images -> ({input name: N x 1 x H x W float32}, single) with the artifact's spec.

        `single` is True when one B-scan (H x W array or one path) was given.
        """
        names = self.meta.input_names
        if isinstance(images, Mapping):
            given = set(map(str, images))
            if given != set(names):
                raise InputError(f"wrong modality set: got {sorted(given)}, this artifact takes {names}")
            per = {n: _as_images(images[n], n) for n in names}
        else:
            if len(names) > 1:
                raise InputError(f"this artifact takes several modalities {names}; pass a dict name -> images")
            per = {names[0]: _as_images(images, names[0])}
        counts = {n: len(v[0]) for n, v in per.items()}
        if len(set(counts.values())) != 1:
            raise InputError(f"modalities have different numbers of images: {counts}")
        out = {}
        for n, (imgs, _) in per.items():
            spec = self.specs[n]
            out[n] = np.stack([preprocess(im, spec) for im in imgs]) if imgs else np.empty((0, 1, *spec.size),
                                                                                             np.float32)
        single = all(s for _, s in per.values())
        return out, single

    # ------------------------------------------------------------------------ inference
    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw model call on preprocessed N x 1 x H x W float32 input(s); returns {output name: array}.

        Batches larger than the artifact allows are split (a fixed-batch model gets padded).
        """
        names = self.meta.input_names
        feeds = dict(inputs) if isinstance(inputs, Mapping) else {names[0]: inputs}
        if set(feeds) != set(names):
            raise InputError(f"wrong modality set: got {sorted(feeds)}, this artifact takes {names}")
        for n, x in feeds.items():
            exp = (1, *self.specs[n].size)
            if isinstance(x, np.ndarray) and x.ndim == 4 and n in self._dynamic_hw:
                exp = (1, *x.shape[2:])  # a graph exported with dynamic H and W takes any size
            if not isinstance(x, np.ndarray) or x.ndim != 4 or tuple(x.shape[1:]) != exp:
                shape = getattr(x, "shape", type(x).__name__)
                raise InputError(f"input {n!r} must be N x {exp[0]} x {exp[1]} x {exp[2]}, got {shape}")
            if x.dtype != np.float32:
                raise InputError(f"input {n!r} must be float32 (preprocessed), got {x.dtype}")
        n_total = feeds[names[0]].shape[0]
        step = self._fixed_batch or self._max_batch or n_total or 1
        chunks: list[dict[str, np.ndarray]] = []
        for i in range(0, n_total, step):
            part = {k: np.ascontiguousarray(v[i:i + step]) for k, v in feeds.items()}
            real = next(iter(part.values())).shape[0]
            if self._fixed_batch and real < self._fixed_batch:
                part = {k: np.concatenate([v, np.repeat(v[-1:], self._fixed_batch - real, 0)]) for k, v in part.items()}
            res = self.engine.run(part)
            chunks.append({k: v[:real] for k, v in res.items()})
        if not chunks:
            raise InputError("no images to predict")
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def predict(self, images: Images) -> np.ndarray:
        """Predictions for one B-scan (H x W), a batch/volume (N x H x W, list of arrays or files).

        classification -> float32 probabilities (K, or N x K); segmentation -> class-index masks
        (`artifact.mask_dtype`) at the model's input size (H' x W', or N x H' x W'; resize back
        with `mirage_edge.data.preprocess.resize_mask`); encoder -> features (one sample's, or N x ...).
        """
        feeds, single = self.preprocess(images)
        out = self.run(feeds)[self.meta.outputs[0].name]
        kind = self.meta.outputs[0].kind
        if self.task == "classification" and kind == "logits":
            out = _softmax(out.astype(np.float32))
        elif self.task == "segmentation" and kind == "logits":
            out = out.argmax(axis=1).astype(mask_dtype(out.shape[1]))
        return out[0] if single else out

    def predict_logits(self, images: Images) -> np.ndarray:
        """The model's raw first output (logits / mask / features) for `images`."""
        feeds, single = self.preprocess(images)
        out = self.run(feeds)[self.meta.outputs[0].name]
        return out[0] if single else out


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _check_array(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.bool_ or not any(a.dtype == d for d in _DTYPES):
        raise InputError(f"{what}: unsupported dtype {a.dtype}; use uint8, uint16 or float (values in [0, 1])")
    if a.size == 0:
        raise InputError(f"{what}: empty image of shape {a.shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise InputError(f"{what}: {bad} NaN/infinite pixel value(s)")
    return a


def _as_images(obj: Any, name: str) -> tuple[list[np.ndarray], bool]:
    """-> (list of H x W arrays, single?) from an array, a path, or a sequence of either."""
    if isinstance(obj, (str, Path)):
        return [_check_array(read_image(obj), str(obj))], True
    if isinstance(obj, np.ndarray):
        if obj.ndim == 2:
            return [_check_array(obj, f"{name} image")], True
        if obj.ndim == 3:
            _check_array(obj, f"{name} volume")
            return [obj[i] for i in range(obj.shape[0])], False
        hint = " (squeeze the channel axis: pass N x H x W)" if obj.ndim == 4 else ""
        raise InputError(f"{name}: expected one B-scan H x W or a batch N x H x W, got rank {obj.ndim} "
                         f"shape {obj.shape}{hint}")
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise InputError(f"{name}: empty list of images")
        out = []
        for i, item in enumerate(obj):
            if isinstance(item, (str, Path)):
                out.append(_check_array(read_image(item), str(item)))
            elif isinstance(item, np.ndarray):
                if item.ndim != 2:
                    raise InputError(f"{name}[{i}]: expected an H x W B-scan, got shape {item.shape}")
                out.append(_check_array(item, f"{name}[{i}]"))
            else:
                raise InputError(f"{name}[{i}]: expected an array or a file path, got {type(item).__name__}")
        return out, False
    raise InputError(f"{name}: expected an array, a file path or a list of them, got {type(obj).__name__}")
