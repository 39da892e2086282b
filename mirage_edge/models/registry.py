"""Model registry: one table of name -> builder, shared by the teacher and the students.

An entry is a function ``fn(pretrained: bool = False, **kwargs) -> nn.Module``. Builders register
themselves with ``@register_model`` (optionally under an explicit name); `create_model` in
`mirage_edge.models.factory` looks names up here. Torch-free: registering or listing needs no torch.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from typing import Any, Callable

from mirage_edge.errors import ModelNotFoundError

ModelFn = Callable[..., Any]

_REGISTRY: dict[str, ModelFn] = {}
# Modules whose import registers builders. Imported on the first lookup, never at package import,
# so `import mirage_edge.models` stays torch-free. A missing optional module (e.g. students before
# they exist) is skipped; an error *inside* a present module propagates.
_PROVIDERS = ("mirage_edge.models.mirage_sizes", "mirage_edge.models.students")
_loaded = False


def register_model(fn: ModelFn | None = None, *, name: str | None = None) -> Any:
    """Register a builder ``fn(pretrained=False, **kwargs) -> nn.Module``.

    Use as ``@register_model`` (name = function name, ``_`` -> ``-``, so ``mirage_tiny`` is
    ``mirage-tiny``) or ``@register_model(name="resnet18")``. Registering a name twice replaces it.
    """

    def deco(f: ModelFn) -> ModelFn:
        key = name or f.__name__.replace("_", "-")
        _REGISTRY[key] = f
        return f

    return deco(fn) if fn is not None else deco


def _load_providers() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # the module exists but one of its imports is missing
                raise


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the shell-style `pattern` (e.g. ``"mirage-*"``)."""
    _load_providers()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    _load_providers()
    return name in _REGISTRY


def get_model_fn(name: str) -> ModelFn:
    """The builder registered as `name`; ModelNotFoundError with close matches otherwise."""
    _load_providers()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY) + ["mirage"], n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelNotFoundError(
            f"unknown model {name!r}{hint} (see `mirage_edge.models.list_models()`)"
        ) from None


def build_model(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """Call the builder registered as `name`; the module remembers how it was built.

    `mirage_edge_spec` (name + kwargs, unless the builder set its own) is what `save_model` writes,
    so a checkpoint rebuilds the same module.
    """
    model = get_model_fn(name)(pretrained=pretrained, **kwargs)
    if getattr(model, "mirage_edge_spec", None) is None:
        try:
            model.mirage_edge_spec = {"name": name, "kwargs": dict(kwargs)}
        except AttributeError:  # pragma: no cover - exotic modules
            pass
    return model
