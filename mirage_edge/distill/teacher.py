"""The teacher side of distillation: load any MIRAGE teacher, hash its weights, produce targets.

`load_teacher(spec)` accepts a registered name (``mirage-tiny``, ``mirage-large`` ...), a checkpoint
path (our folder format, an official ``.pth``) or ``hf:<dir>`` (a local Hugging Face snapshot);
loading itself is `mirage_edge.models.create_model`'s job. The result may be an encoder or a
fine-tuned task model (``SegmentationModel`` / ``ClassificationModel``); :class:`Teacher` exposes
both the encoder targets (stage 1) and the task logits (stage 2).

Targets, per sample (what the cache stores), for a teacher fed the modalities `modalities` in that
order with the B-scan first:

* ``tokens``: (N + G) x D - the teacher's B-scan patch tokens (row-major) then its G global tokens.
  With a B-scan + SLO teacher these are the B-scan tokens *after* attending to the SLO: the
  student, which sees the B-scan only, learns to predict multimodal features (cross-modal KD).
* ``l<i>``: N x D - B-scan patch tokens after encoder block i (intermediate-layer matching).
* ``logits``: K or K x H x W - the fine-tuned teacher's task logits on the B-scan.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mirage_edge.distill.recipe import DistillRecipe
from mirage_edge.errors import ConfigError, InputError, WeightsNotFoundError


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (sorted names, dtype, shape, bytes) of `model`."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape: a 0-d buffer (BatchNorm's num_batches_tracked) has no byte view; n-d bytes are unchanged
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_teacher(spec: str, *, random_weights: bool = False, input_size: int | tuple[int, int] | None = None,
                 config: str | Path | None = None) -> nn.Module:
    """Build the teacher module from a name, path or ``hf:<dir>`` (see module docstring).

    A registered name loads its official weights (WeightsNotFoundError saying where to put them
    when they are not found) unless `random_weights` asks for a random initialisation on purpose:
    a random teacher by accident would distil noise and still exit 0.
    """
    from mirage_edge.models import create_model
    from mirage_edge.models.registry import is_model

    kwargs: dict[str, Any] = {}
    if is_model(spec):
        from mirage_edge.models.students import is_student

        if is_student(spec):  # pretrained=True would fetch ImageNet weights of a student family
            raise ConfigError(f"teacher {spec!r} is a student architecture, not a MIRAGE teacher: pass "
                              "mirage-base / mirage-large or a teacher checkpoint")
        if input_size is not None:
            kwargs["input_size"] = input_size if isinstance(input_size, int) else tuple(input_size)
        try:
            model = create_model(spec, pretrained=not random_weights, **kwargs)
        except WeightsNotFoundError as exc:
            raise WeightsNotFoundError(f"teacher: {exc}; or --random-teacher (teacher.random_weights = true) to "
                                       "distil from random weights on purpose") from None
    else:
        if not spec.startswith("hf:") and not Path(spec).exists():
            raise ConfigError(f"teacher {spec!r} is neither a registered model nor an existing path "
                              f"(nor hf:<dir>)")
        model = create_model("mirage", checkpoint=spec, config=config or None)
    return model


class Teacher:
    """A frozen teacher (encoder or task model) with the targets distillation needs.

    model:      the loaded module (eval mode, no grads).
    modalities: inputs the teacher sees, B-scan first (e.g. ["bscan"] or ["bscan", "slo"]).
    layers:     encoder blocks whose B-scan tokens are intermediate targets.
    """

    def __init__(self, model: nn.Module, modalities: Sequence[str] = ("bscan",),
                 layers: Sequence[int] = (), name: str = "", random_weights: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        self.random_weights = random_weights
        self.name = name
        is_task = hasattr(model, "head") and hasattr(model, "encoder")
        # MIRAGE's own `.encoder` is its block list; only task models wrap an encoder module
        self.encoder = model.encoder if is_task else model
        self.task = getattr(model, "task", None) if is_task else None
        self.modalities = list(modalities)
        if not self.modalities or self.modalities[0] != "bscan":
            raise ConfigError(f"teacher modalities must start with 'bscan', got {self.modalities}")
        known = getattr(self.encoder, "modalities", None)
        if known is not None:
            bad = [m for m in self.modalities if m not in known]
            if bad:
                raise ConfigError(f"teacher {name!r} has no input(s) {bad}; it takes {list(known)}")
        depth = len(getattr(self.encoder, "encoder", []))
        self.depth = depth
        self.layers = [int(i) + depth if int(i) < 0 else int(i) for i in layers]
        bad = [i for i in self.layers if not 0 <= i < max(depth, 1)]
        if bad:
            raise ConfigError(f"teacher layers {list(layers)} out of range for depth {depth}")
        self.embed_dim = int(self.encoder.embed_dim)
        self.num_global_tokens = int(self.encoder.num_global_tokens)
        self._hash: str | None = None

    # -- description ---------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.encoder.input_size)  # type: ignore[return-value]

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.input_size
        return tuple(self.encoder.token_grid(h, w))  # type: ignore[return-value]

    @property
    def num_classes(self) -> int | None:
        return int(self.model.num_classes) if self.task else None

    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = weights_hash(self.model)
        return self._hash

    def output_shapes(self, with_logits: bool) -> dict[str, list[int]]:
        gh, gw = self.grid
        n, d = gh * gw, self.embed_dim
        shapes = {"tokens": [n + self.num_global_tokens, d]}
        shapes.update({f"l{i}": [n, d] for i in self.layers})
        if with_logits:
            if not self.task:
                raise ConfigError(f"teacher {self.name!r} is an encoder without a task head; stage 2 "
                                  "(task-aware distillation) needs a fine-tuned teacher (mirage-edge train)")
            k = self.num_classes
            shapes["logits"] = [k, *self.input_size] if self.task == "segmentation" else [k]
        return shapes

    def describe(self) -> dict[str, Any]:
        # weights_sha256: over the loaded tensors (the cache key); weights_file: the file(s) it came from,
        # their SHA-256 and source (hub repo + commit, release URL, path), None for random weights
        return {"name": self.name, "random_weights": self.random_weights, "weights_sha256": self.weights_hash(),
                "weights_file": getattr(self.model, "mirage_edge_weights", None),
                "modalities": self.modalities,
                "layers": self.layers, "embed_dim": self.embed_dim, "num_global_tokens": self.num_global_tokens,
                "input_size": list(self.input_size), "grid": list(self.grid), "task": self.task}

    # -- targets ---------------------------------------------------------------------------------
    def _inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise InputError(f"teacher needs modalities {self.modalities}; batch lacks {missing}")
        return {m: inputs[m] for m in self.modalities}

    @torch.no_grad()
    def targets(self, inputs: Mapping[str, torch.Tensor], with_logits: bool = False) -> dict[str, torch.Tensor]:
        """name -> B x ... targets (see module docstring) for a batch of teacher inputs."""
        x = self._inputs(inputs)
        gh, gw = self.grid
        n, g = gh * gw, self.num_global_tokens
        wanted = sorted(set(self.layers) | {self.depth - 1}) if self.depth else []
        if wanted and hasattr(self.encoder, "forward_intermediates"):
            outs = dict(zip(wanted, self.encoder.forward_intermediates(x, wanted)))
            final = outs[self.depth - 1]
        else:
            outs, final = {}, self.encoder.forward_features(x)
        # B-scan block comes first (dict order); global tokens are last
        res = {"tokens": torch.cat([final[:, :n], final[:, final.shape[1] - g:]], dim=1) if g else final[:, :n]}
        for i in self.layers:
            res[f"l{i}"] = outs[i][:, :n]
        if with_logits:
            if not self.task:
                raise ConfigError("stage 2 needs a fine-tuned (task) teacher")
            res["logits"] = self.model(x["bscan"])
        return {k: v.float() for k, v in res.items()}


def build_teacher(recipe: DistillRecipe, log: Callable[[str], None]) -> Teacher:
    """The recipe's teacher at `data.image_size` (positional tables resampled if built for another size)."""
    from mirage_edge.models.registry import is_model

    size = recipe.data.hw
    random = recipe.teacher.random_weights and is_model(recipe.teacher.model)
    model = load_teacher(recipe.teacher.model, random_weights=random, input_size=size,
                         config=recipe.teacher.config or None)
    if random:
        log(f"teacher {recipe.teacher.model}: RANDOM WEIGHTS (teacher.random_weights = true); the student "
            "learns to imitate noise - for tests and timing only")
    enc = getattr(model, "encoder", model) if hasattr(model, "head") else model
    if tuple(enc.input_size) != size:
        if not hasattr(enc, "set_input_size"):
            raise ConfigError(f"teacher input size {tuple(enc.input_size)} != data.image_size {size}")
        log(f"teacher built for {tuple(enc.input_size)}: positional tables resampled to {size[0]}x{size[1]}")
        enc.set_input_size(size)
    return Teacher(model, recipe.teacher.modalities, recipe.teacher.layers, name=recipe.teacher.model,
                   random_weights=random)


__all__ = ["Teacher", "load_teacher", "build_teacher", "weights_hash"]
