"""Typed configs: dataclasses loaded strictly from TOML/JSON/dicts, shared by CLI and Python API.

Every config in mirage-edge (train configs, distill recipes, export targets, bench suites, model
architectures, preprocessing specs) is a dataclass; this module turns files (which may `extends`
another file), CLI flags and `key.sub=value` overrides into them (`load`), failing on unknown keys
and wrong types with the key path and the file named. Torch-free.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

from mirage_edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

T = TypeVar("T")


def _where(source: str | None, key: str) -> str:
    loc = f"'{key}'" if key else "the top level"
    return f"{loc} in {source}" if source else loc


def _coerce(tp: Any, value: Any, key: str, source: str | None) -> Any:
    """Check `value` against the annotation `tp` (converting lists to tuples etc.)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_where(source, key)}: {value!r} fits none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{_where(source, key)} must be one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, key)} must be a table, got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, key)} must be a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_where(source, key)} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, key)} must be a table, got {type(value).__name__}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(source, key)} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(source, key)} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source, key)} must be a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{_where(source, key)} must be a path string, got {value!r}")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{_where(source, key)} must be {tp.__name__}, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types.

    `source` (a file name) and `prefix` (the key path so far) go into error messages.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(source, prefix)} must be a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown key {_where(source, path)}{hint} (allowed: {', '.join(sorted(fields))})"
            )
        kwargs[key] = _coerce(hints[key], value, path, source)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join(repr(m) for m in missing)} in {source or prefix or 'config'}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise ConfigError(f"{source or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON/TOML-able dict (tuples become lists, Paths strings)."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return clean(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3). The value is parsed as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def _set(data: dict[str, Any], keys: Sequence[str], value: Any, what: str) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{what}: '{k}' is not a table")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each 'a.b=value' override set (tables created as needed)."""
    out = json.loads(json.dumps(data, default=str))
    for text in overrides:
        keys, value = parse_override(text)
        _set(out, keys, value, f"override {text!r}")
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON file into a dict, with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must contain a table at the top level")
    return data


def curated_names(folders: Sequence[Path]) -> list[str]:
    """Names (file stems) of the *.toml configs in `folders`, sorted."""
    return sorted({q.stem for f in folders if f.is_dir() for q in f.glob("*.toml")})


def find_config(name_or_path: str | Path, folders: Sequence[Path]) -> Path | None:
    """An existing file, else a curated config in the first of `folders` holding it: a bare NAME or
    NAME.toml, or a path ending in that folder (``distill/recipes/tiny-demo.toml`` from any cwd)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    return _curated(p, folders)


def _curated(p: Path, folders: Sequence[Path]) -> Path | None:
    for folder in folders:
        # any other path names one file: a typo must not silently pick a curated config
        if p.parent != Path(".") and not folder.as_posix().endswith("/" + p.parent.as_posix()):
            continue
        for cand in (folder / p.name, folder / f"{p.name}.toml"):
            if cand.is_file():
                return cand
    return None


def read_config(path: str | Path, curated: Sequence[Path] = ()) -> dict[str, Any]:
    """`read_file` plus inheritance: a file may say ``extends = "NAME|PATH"`` and then only its changes.

    The parent is a path relative to the file, else a bare NAME of a config in `curated`; it may
    extend in turn. Tables merge key by key (the child wins); other values, lists too, are replaced.
    """
    p, chain, layers = Path(path), [], []
    while True:
        if p.resolve() in chain:
            names = " -> ".join(str(c) for c in [*chain, p.resolve()])
            raise ConfigError(f"'extends' makes a cycle: {names}")
        chain.append(p.resolve())
        data = read_file(p)
        parent = data.pop("extends", None)
        layers.append(data)
        if parent is None:
            break
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"'extends' in {p} must be a config name or path, got {parent!r}")
        nxt = p.parent / parent if (p.parent / parent).is_file() else _curated(Path(parent), curated)
        if nxt is None:
            known = curated_names(curated)
            raise ConfigError(f"'extends = {parent!r}' in {p}: no such file next to it"
                              + (f", nor a curated name ({', '.join(known)})" if known else ""))
        p = nxt
    out: dict[str, Any] = {}
    for layer in reversed(layers):
        out = _deep_merge(out, layer)
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
         base: Mapping[str, Any] | None = None, *, sets: Mapping[str, Any] | None = None,
         curated: Sequence[Path] = ()) -> T:
    """The one way to build a config: `base` (dict) < `path` (TOML/JSON, may `extends` another, see
    `read_config`) < `sets` (dotted key -> value, e.g. CLI flags; None = not given) < `overrides`
    ('a.b=value' strings). Strict: unknown keys and wrong types fail naming the key and the source."""
    data: dict[str, Any] = dict(base or {})
    sources = []
    if path is not None:
        data = _deep_merge(data, read_config(path, curated))
        sources.append(str(path))
    given = {k: v for k, v in (sets or {}).items() if v is not None}
    if given:
        data = copy.deepcopy(data)  # `base` may share nested tables with the caller
    for key, value in given.items():
        _set(data, key.split("."), value, f"setting {key!r}")
    data = apply_overrides(data, overrides)
    if given or overrides:
        sources.append("command-line overrides")
    return from_dict(cls, data, source=" + ".join(sources) or None)


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Minimal TOML writer for configs (tables, scalars, lists); enough to round-trip our dataclasses."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{key(str(k))} = {scalar(x)}" for k, x in v.items()) + "}"
        if v is None:
            raise ConfigError("TOML has no null; drop None values before writing")
        return json.dumps(str(v))

    def key(k: str) -> str:  # dotted or odd keys (per_student's "qat.epochs") are quoted to stay one key
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    lines: list[str] = []

    def table(prefix: str, d: Mapping[str, Any]) -> None:
        subs = []
        for k, v in d.items():
            if v is None:
                continue
            if isinstance(v, Mapping) and v:
                subs.append((k, v))
            else:
                lines.append(f"{key(str(k))} = {scalar(v)}")
        for k, v in subs:
            name = f"{prefix}.{key(str(k))}" if prefix else key(str(k))
            lines.append("")
            lines.append(f"[{name}]")
            table(name, v)

    table("", data)
    return "\n".join(lines).strip() + "\n"


__all__ = ["from_dict", "to_dict", "load", "read_file", "read_config", "find_config", "curated_names",
           "apply_overrides", "parse_override", "dumps_toml"]
