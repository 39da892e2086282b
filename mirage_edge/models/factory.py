"""`create_model`: the one factory for teachers and students."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from mirage_edge.errors import ConfigError
from mirage_edge.models.registry import build_model, get_model_fn


def create_model(name: str, pretrained: bool = False, checkpoint: str | Path | None = None,
                 config: Mapping[str, Any] | str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model or load one from a checkpoint.

    * ``create_model("mirage-tiny")`` - random init; overrides are MirageConfig fields
      (``input_size=256``, ``out_domains=[]``, ``in_domains=["bscan"]`` ...).
    * ``create_model("mirage-large", pretrained=True)`` - official weights (see `weights`).
    * ``create_model("mirage", checkpoint=PATH[, config=CFG])`` - official ``.pth``, HF folder or
      our folder; the architecture comes from the file (`config`: dict/JSON with the head
      counts etc. for sizes other than Base/Large). A size name with `checkpoint` works the same.
    * ``create_model("mirage", config=CFG)`` - random init of an arbitrary MirageConfig.
    * students: any name registered with ``@register_model`` (fn(pretrained=False, **kwargs)).
    Unknown names raise ModelNotFoundError with close matches.
    """
    if checkpoint is not None:
        from mirage_edge.models.checkpoint import load_model
        from mirage_edge.models.weights import resolve

        if pretrained:
            raise ConfigError("give either pretrained=True or checkpoint=..., not both")
        found = resolve(checkpoint, download=False)
        model = load_model(found.path, config=config, **overrides)
        model.mirage_edge_weights = found.record  # what was loaded, with its SHA-256 (runs record it)
        return model
    if name == "mirage":
        if config is None:
            raise ConfigError('create_model("mirage") needs checkpoint=... or config=...')
        from mirage_edge.models.config import MirageConfig
        from mirage_edge.models.mirage import MIRAGE

        return MIRAGE(MirageConfig.load(config).with_options(overrides))
    if config is not None:
        get_model_fn(name)  # an unknown name fails first, with close matches
        raise ConfigError(f"config= is only for create_model('mirage', ...); for {name!r} pass options "
                          "as keywords")
    return build_model(name, pretrained=pretrained, **overrides)
