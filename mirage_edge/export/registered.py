"""A registered model name -> the module to export, like a fine-tuned teacher or a student.

`mirage-edge export mirage-base --task segmentation --num-classes 9` builds MIRAGE-Base's B-scan
encoder with a fresh task head (the official ConvNeXt segmentation head, or the linear
classification head), so the artifact has the same output contract as a fine-tuned teacher's and
can be timed against a student's. Without a task the name exports its encoder (features).

Weights: the official ones (found locally, or fetched per `mirage_edge.models.weights`; a
`WeightsNotFoundError` says where to put them), or random weights on purpose (`random_weights`,
`--random-weights`): seeded, so the same command gives the same model and the same weights hash
(the bench keys its artifact cache on it). A random head on official weights is random too: the
artifact is then for timing only, and its metadata says so (`build.weights`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from mirage_edge._deps import require
from mirage_edge.artifact import SourceInfo
from mirage_edge.errors import ConfigError, WeightsNotFoundError

TASKS = ("segmentation", "classification")
SEED = 0  # random weights are drawn from this seed (torch's global RNG, forked)


@dataclasses.dataclass
class RegisteredModel:
    """A built registered model with what an artifact records about its weights."""

    model: Any
    source: SourceInfo
    build: dict[str, Any]  # {"weights": "official" | "random (seed N)", "weights_sha256", "head"}

    @property
    def random(self) -> bool:
        return str(self.build.get("weights", "")).startswith("random")


def parse_head(items: list[str] | tuple[str, ...] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Head options from `KEY=VALUE` strings (values read as TOML: 2, 0.5, "cls", true) or a mapping."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--head expects KEY=VALUE (e.g. depth=2), got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()  # a bare word: a string (pool=cls)
    return out


def _is_mirage(name: str) -> bool:
    from mirage_edge.models.config import SIZES

    return name in SIZES


def registered_model(name: str, *, task: str = "auto", num_classes: int | None = None,
                     head: Mapping[str, Any] | None = None, random_weights: bool = False,
                     input_size: tuple[int, int] | int | None = None, seed: int = SEED,
                     hash_weights: bool = True) -> RegisteredModel:
    """Build registered model `name` for export: its encoder (task "auto"/"encoder") or the encoder
    with a fresh `task` head of `num_classes` classes (`head`: options of `ConvNeXtSegHead` /
    `ClsHead`; default the official heads).

    Official weights unless `random_weights`; bad sizes and options fail before any weights are
    looked for. `hash_weights` = False leaves out `build["weights_sha256"]` (seconds for
    MIRAGE-Large). Raises ConfigError / WeightsNotFoundError (one line, saying what to do).
    """
    from mirage_edge.models.registry import is_model

    if not is_model(name):
        raise ConfigError(f"{name!r} is not a registered model name")
    head = dict(head or {})
    if task in TASKS:
        if num_classes is None or int(num_classes) < 1:
            raise ConfigError(f"--task {task} on the registered model {name!r} builds a fresh {task} head: "
                              "give its class count with --num-classes K (K >= 1)")
    elif num_classes is not None or head:
        raise ConfigError("--num-classes / --head build a task head: give --task segmentation or "
                          f"--task classification with them (got --task {task})")
    mirage = _is_mirage(name)
    kwargs: dict[str, Any] = {}
    if input_size is not None:
        kwargs["input_size"] = tuple(input_size) if not isinstance(input_size, int) else input_size
    if mirage and task in TASKS:
        # the B-scan encoder alone: a task head reads its tokens, the pretraining decoders go
        kwargs.update(in_domains=["bscan"], out_domains=[])
    if mirage:
        from mirage_edge.models.config import size_config

        try:  # torch-free: a bad size fails before weights are looked for (or built)
            size_config(name, **kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    torch = require("torch", "export")
    from mirage_edge.models import create_model
    from mirage_edge.models.students import is_student

    if not random_weights and is_student(name):
        raise ConfigError(f"{name!r} is a student architecture without weights of its own: export a distilled "
                          "student folder (mirage-edge distill), or pass --random-weights to export random "
                          "weights on purpose (timing only)")
    if random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = _with_head(create_model(name, **kwargs), task, num_classes, head)
        weights = f"random (seed {int(seed)})"
    else:
        try:
            encoder = create_model(name, pretrained=True, **kwargs)
        except WeightsNotFoundError as exc:
            raise WeightsNotFoundError(f"{exc}; or --random-weights to export random weights on purpose "
                                       "(timing only)") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = _with_head(encoder, task, num_classes, head)
        weights = "official" if task not in TASKS else f"official encoder, random {task} head (seed {int(seed)})"
    model.eval()
    build: dict[str, Any] = {"weights": weights}
    if hash_weights:
        from mirage_edge.distill.teacher import weights_hash

        build["weights_sha256"] = weights_hash(model)
    if task in TASKS:
        build["head"] = dict(model.head.config)
    src = getattr(model, "mirage_edge_source", None) or getattr(getattr(model, "encoder", None),
                                                               "mirage_edge_source", None)
    path = Path(src["path"]) if isinstance(src, dict) and src.get("path") else None
    file_sha = ""
    if path is not None:
        from mirage_edge._io import sha256_file

        weights_file = path / "model.safetensors" if path.is_dir() else path
        file_sha = sha256_file(weights_file) if weights_file.is_file() else ""
    source = SourceInfo(model_name=name, checkpoint=str(path or ""), checkpoint_sha256=file_sha)
    return RegisteredModel(model, source, build)


def _with_head(encoder: Any, task: str, num_classes: int | None, head: dict[str, Any]) -> Any:
    if task not in TASKS:
        return encoder
    from mirage_edge.models.task import classification_model, segmentation_model

    try:
        if task == "segmentation":
            return segmentation_model(encoder, int(num_classes), **head)  # type: ignore[arg-type]
        return classification_model(encoder, int(num_classes), **head)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"bad --head option for a {task} head: {exc}") from None


__all__ = ["registered_model", "RegisteredModel", "parse_head", "TASKS", "SEED"]
