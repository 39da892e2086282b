"""Registered MIRAGE sizes: mirage-tiny (ours), mirage-base, mirage-large (official)."""
from __future__ import annotations

from typing import Any

from torch import nn

from mirage_edge.models.config import size_config
from mirage_edge.models.registry import register_model


def build_mirage(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Random-init MIRAGE of size `name`, or its official weights with ``pretrained=True``.

    kwargs: MirageConfig fields (plus ``input_size`` int/(H, W), ``weights`` path/hf:<dir>,
    ``device`` e.g. "meta" for a shape-only model).
    """
    import torch

    from mirage_edge.models.mirage import MIRAGE

    device = kwargs.pop("device", "cpu")
    weights = kwargs.pop("weights", None)
    if pretrained or weights is not None:
        from mirage_edge.models.checkpoint import load_model
        from mirage_edge.models.weights import resolve

        found = resolve(weights or name)
        model = load_model(found.path, **kwargs)
        model.mirage_edge_spec = {"name": name, "kwargs": kwargs}
        model.mirage_edge_weights = found.record  # what was loaded, with its SHA-256 (runs record it)
        return model
    cfg = size_config(name, **kwargs)
    with torch.device(device):
        model = MIRAGE(cfg)
    model.mirage_edge_spec = {"name": name, "kwargs": kwargs}
    return model


@register_model(name="mirage-tiny")
def mirage_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Ours: dim 192, depth 4, 3 heads, decoders 128/1/4; official patches, sizes and tables."""
    return build_mirage("mirage-tiny", pretrained, **kwargs)


@register_model(name="mirage-base")
def mirage_base(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Official MIRAGE-Base (ViT-B: 768, 12 blocks, 12 heads; decoders 256/2/8)."""
    return build_mirage("mirage-base", pretrained, **kwargs)


@register_model(name="mirage-large")
def mirage_large(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Official MIRAGE-Large (ViT-L: 1024, 24 blocks, 16 heads; decoders 256/2/8)."""
    return build_mirage("mirage-large", pretrained, **kwargs)
