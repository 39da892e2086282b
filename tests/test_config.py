from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mirage_edge.config import dumps_toml, from_dict, load, to_dict
from mirage_edge.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str
    task: Literal["cls", "seg"] = "seg"
    epochs: int = 3
    optim: Optim = field(default_factory=Optim)
    data: Optional[str] = None


def test_roundtrip_through_toml(tmp_path):
    cfg = Cfg(name="x", task="cls", epochs=5, optim=Optim(lr=3e-4), data="d")
    p = tmp_path / "c.toml"
    p.write_text(dumps_toml(to_dict(cfg)))
    assert load(Cfg, p) == cfg


def test_overrides_and_int_to_float(tmp_path):
    cfg = load(Cfg, None, ["optim.lr=1", "epochs=7"], base={"name": "a"})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.epochs == 7


def test_unknown_key_is_named_with_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "a"\n[optim]\nlrr = 1e-3\n')
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' in .*c.toml.*did you mean 'lr'"):
        load(Cfg, p)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"name": "a", "epochs": "3"}, "'epochs'.*integer"),
        ({"name": "a", "task": "det"}, "'task'.*one of"),
        ({"name": "a", "optim": {"betas": [0.9]}}, "betas.*2 items"),
        ({}, "missing required key.*'name'"),
        ({"name": "a", "epochs": True}, "'epochs'.*integer"),
    ],
)
def test_wrong_types(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Cfg, data, source="x.toml")


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(Cfg, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="cannot parse .*bad.toml"):
        load(Cfg, bad)
