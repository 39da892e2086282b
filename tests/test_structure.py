"""Import structure of `mirage_edge`, read with `ast` (nothing is imported): no import cycles between
modules, no private names taken from another module, and the layers of CONTRIBUTING.md.

Every import counts, module-level or inside a function: a function-local import only hides a
cycle until the function runs. A package `__init__` importing its own submodules does not count
as a dependency (importing a submodule runs its package's `__init__` first anyway, and the lazy
`__getattr__` tables name submodules as strings); everything else it imports does.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "mirage_edge"

# Who may import whom, by area (the first name under mirage_edge; "" is mirage_edge/__init__).
# Shared base modules import only each other; `cli` names its subcommands as strings.
BASE = frozenset({"", "errors", "config", "_io", "_deps", "_lazy", "_log", "artifact"})
_BELOW = {"data": set(), "metrics": {"data"}, "runtime": {"data"}, "models": {"data", "metrics"}}
_BELOW["train"] = _BELOW["models"] | {"models"}
_BELOW["distill"] = _BELOW["train"] | {"train"}
_BELOW["export"] = _BELOW["distill"] | {"distill", "runtime"}
_BELOW["bench"] = _BELOW["export"] | {"export"}
ALLOWED = {**{a: BASE | b for a, b in _BELOW.items()}, **{b: BASE for b in BASE}, "cli": BASE}
# Known upward imports (importing module, imported module or package prefix): none left; keep it so.
LAYER_EXCEPTIONS: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Import:
    src: str       # importing module
    dst: str       # imported module
    name: str      # attribute taken from `dst` ("" when a module itself is imported)
    line: int

    def __str__(self) -> str:
        what = f"{self.dst}.{self.name}" if self.name else self.dst
        return f"{self.src}:{self.line} imports {what}"


def find_modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every .py file under `package_dir`."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def find_imports(modules: dict[str, tuple[Path, bool]]) -> list[Import]:
    """Every import of one of `modules` by another, incl. function-local and relative imports, plus
    `alias._name` uses of an imported module (a private attribute taken without an import line)."""
    root = next(iter(modules)).split(".")[0]
    found: list[Import] = []
    for src, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = src if is_pkg else src.rpartition(".")[0]
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == root:
                        found.append(Import(src, a.name, "", node.lineno))
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([mod] if mod else []))
                if mod.split(".")[0] != root:
                    continue
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    if sub in modules:  # `from pkg import submodule`
                        found.append(Import(src, sub, "", node.lineno))
                        aliases[a.asname or a.name] = sub
                    else:
                        found.append(Import(src, mod, a.name, node.lineno))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                found.append(Import(src, aliases[node.value.id], node.attr, node.lineno))
    return [i for i in found if i.dst in modules and i.dst != i.src
            and not (modules[i.src][1] and i.dst.startswith(i.src + "."))]


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(imports: list[Import]) -> list[str]:
    return sorted({str(i) for i in imports if is_private(i.name)})


def cycles(imports: list[Import]) -> list[list[str]]:
    """One shortest cycle per strongly connected group of modules (Tarjan), as a list of modules."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.src, set()).add(i.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:  # breadth-first inside the group: the shortest way back to its first module
        start = min(group)
        paths = {start: [start]}
        queue = [start]
        for v in queue:  # `queue` grows while it is walked
            back = start in graph[v]
            for w in sorted(graph[v] & group):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
            if back:
                out.append(paths[v] + [start])
                break
    return sorted(out)


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(imports: list[Import]) -> list[str]:
    def excepted(i: Import) -> bool:
        return any(i.src == src and (i.dst + ".").startswith(dst) for src, dst in LAYER_EXCEPTIONS)

    return sorted({str(i) for i in imports
                   if area(i.dst) not in ALLOWED.get(area(i.src), BASE) | {area(i.src)} and not excepted(i)})


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return find_imports(find_modules(PACKAGE_DIR))


def test_no_import_cycles(imports):
    found = cycles(imports)
    assert not found, ("import cycles (make what they share a public function of the module that owns it):\n"
                       + "\n".join(" -> ".join(c) for c in found))


def test_no_private_names_across_modules(imports):
    found = private_imports(imports)
    assert not found, ("private names used from another module (make them public where they belong):\n"
                       + "\n".join(found))


def test_layers(imports):
    found = layer_violations(imports)
    assert not found, "imports against the layers of CONTRIBUTING.md:\n" + "\n".join(found)


def test_every_area_has_layer_rules():
    areas = {area(m) for m in find_modules(PACKAGE_DIR)}
    assert areas <= set(ALLOWED), f"add {sorted(areas - set(ALLOWED))} to ALLOWED in this file"


# ------------------------------------------------------------------------------- the checker itself
def _tree(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    for rel, text in files.items():
        p = tmp_path / "mirage_edge" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return find_imports(find_modules(tmp_path / "mirage_edge"))


def test_checker_sees_function_local_cycles_and_private_names(tmp_path):
    imports = _tree(tmp_path, {
        "__init__.py": "",
        "distill/__init__.py": "",
        "distill/loop.py": "def distill():\n    from mirage_edge.distill.qat_stage import run_qat\n",
        "distill/qat_stage.py": "def run_qat():\n    from mirage_edge.distill.loop import _run_stage\n",
    })
    assert cycles(imports) == [["mirage_edge.distill.loop", "mirage_edge.distill.qat_stage",
                                "mirage_edge.distill.loop"]]
    assert private_imports(imports) == [
        "mirage_edge.distill.qat_stage:2 imports mirage_edge.distill.loop._run_stage"]


def test_checker_resolves_submodule_relative_and_alias_imports(tmp_path):
    imports = _tree(tmp_path, {
        "__init__.py": "from mirage_edge._lazy import lazy\n__version__ = '1'\n",
        "_lazy.py": "lazy = 1\n",
        "config.py": "from mirage_edge.models import cfg\n",
        "models/__init__.py": "from mirage_edge.models.cfg import X\n",  # own submodule: not an edge
        "models/cfg.py": "from mirage_edge import __version__, config as C\nX = C._merge\n",
        "data/__init__.py": "",
        "data/synth.py": "from . import _helpers\nfrom ._helpers import _lesions\n",
        "data/_helpers.py": "",
    })
    assert cycles(imports) == [["mirage_edge.config", "mirage_edge.models.cfg", "mirage_edge.config"]]
    # `_helpers` as a module is fine; a private attribute, imported or via an alias, is not
    assert private_imports(imports) == ["mirage_edge.data.synth:2 imports mirage_edge.data._helpers._lesions",
                                        "mirage_edge.models.cfg:2 imports mirage_edge.config._merge"]
    assert layer_violations(imports) == ["mirage_edge.config:1 imports mirage_edge.models.cfg"]
