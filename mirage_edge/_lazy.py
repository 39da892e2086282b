"""Lazy package exports (PEP 562): `name -> module` tables resolved on first attribute access.

Every package `__init__` that re-exports names from submodules uses `lazy_exports`, so importing a
package never imports its heavy submodules (torch): `import mirage_edge` and `mirage-edge --help`
stay fast and torch-free. Stdlib only.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, table: Mapping[str, str],
                 namespace: Mapping[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, whose names in `table` live in the named modules.

    Use as ``__getattr__, __dir__ = lazy_exports(__name__, {"create_model": "mirage_edge.models.factory"},
    globals())``; `namespace` (the package's globals) makes `dir()` list the eager names too.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
