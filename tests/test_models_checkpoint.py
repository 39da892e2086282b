"""Official checkpoint layouts (keys/shapes of Base/Large), conversion, safe loading, weights resolution."""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mirage_edge import create_model
from mirage_edge.errors import CheckpointError, WeightsNotFoundError
from mirage_edge.models.checkpoint import (RawCheckpoint, model_from_raw, remap_hf, remap_official_pth,
                                           remap_official_seg)
from mirage_edge.models.weights import resolve_weights


def listing(mirage_ref: Path, size: str, fmt: str) -> dict[str, list[int]]:
    doc = json.loads((mirage_ref / f"keys_{size}_{fmt}.json").read_text())
    entries = doc["state_dict"] if fmt == "pth" else doc["tensors"]
    return {e["key"]: list(e["shape"]) for e in entries}


def shapes(model) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_remap_functions_are_pure():
    t = torch.zeros(1)
    sd = {"model.encoder.0.norm1.weight": t, "global_tokens": t}
    assert remap_hf(sd) == {"encoder.0.norm1.weight": t, "global_tokens": t}
    assert list(sd) == ["model.encoder.0.norm1.weight", "global_tokens"]  # input untouched
    ddp = {"module.encoder.0.x": t, "global_tokens": t}
    assert remap_official_pth(ddp) == {"encoder.0.x": t, "global_tokens": t}
    seg = remap_official_seg({"output_adapters.semseg.proj_dec.weight": t, "encoder.1.attn.qkv.bias": t})
    assert seg == {"head.proj_dec.weight": t, "encoder.encoder.1.attn.qkv.bias": t}


@pytest.mark.parametrize("size", ["base", "large"])
def test_official_sizes_build_exact_keys(mirage_ref, size):
    model = create_model(f"mirage-{size}", device="meta")
    assert shapes(model) == listing(mirage_ref, size, "pth")
    enc = create_model(f"mirage-{size}", device="meta", in_domains=["bscan", "slo"], out_domains=[])
    assert {"model." + k: v for k, v in shapes(enc).items()} == listing(mirage_ref, size, "hf")
    doc = json.loads((mirage_ref / f"keys_{size}_pth.json").read_text())
    side = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith("output_adapters."))
    assert side == doc["num_elements_encoder_side"]
    assert sum(v.numel() for v in model.state_dict().values()) == doc["num_elements"]


@pytest.mark.parametrize("size", ["base", "large"])
def test_official_layouts_load_from_listing(mirage_ref, size):
    """Synthesized (meta) official state dicts load strictly; the architecture comes from the file."""
    doc = json.loads((mirage_ref / f"keys_{size}_pth.json").read_text())
    args = doc["args_namespace_reconstructed"]["values"]
    sd = {k: torch.empty(s, device="meta") for k, s in listing(mirage_ref, size, "pth").items()}
    m = model_from_raw(RawCheckpoint("official_pth", sd, Path(f"MIRAGE-{size}.pth"), args=args))
    assert m.cfg.num_heads == {"base": 12, "large": 16}[size] and m.cfg.decoder_num_heads == 8
    assert shapes(m) == listing(mirage_ref, size, "pth")
    hf_doc = json.loads((mirage_ref / f"keys_{size}_hf.json").read_text())
    hsd = {k: torch.empty(s, device="meta") for k, s in listing(mirage_ref, size, "hf").items()}
    for sdx in (hsd, remap_hf(hsd)):  # prefixed (as written) and unprefixed
        h = model_from_raw(RawCheckpoint("hf", sdx, Path("hf"), config=hf_doc["config_json"]))
        assert h.cfg.in_domains == ["bscan", "slo"] and h.output_adapters is None
        assert {"model." + k: v for k, v in shapes(h).items()} == listing(mirage_ref, size, "hf")
    # the downstream segmentation size: tables resized at load time (bicubic), not in forward
    big = model_from_raw(RawCheckpoint("official_pth", sd, Path("x.pth"), args=args), input_size=1024,
                         out_domains=[])
    assert big.input_adapters["bscan"].pos_emb.shape[-2:] == (32, 32)
    # a missing tensor is named in the error
    del sd["encoder.3.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"encoder\.3\.mlp\.fc2\.bias"):
        model_from_raw(RawCheckpoint("official_pth", sd, Path("x.pth"), args=args))


def test_convert_official_and_hf_to_ours(tmp_path, mirage_ref):
    from click.testing import CliRunner

    from mirage_edge.cli import cli

    ref = np.load(mirage_ref / "tiny_reference.npz")
    x = {m: torch.from_numpy(ref[f"input_{m}"]) for m in ("bscan", "slo", "bscanlayermap")}
    res = CliRunner().invoke(cli, ["convert", str(mirage_ref / "tiny_official.pth"), str(tmp_path / "ours"),
                                   "--config", str(mirage_ref / "tiny_config.json")])
    assert res.exit_code == 0, res.output
    m = create_model("mirage", checkpoint=tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(m.forward_features(x).numpy(), ref["tokens_all"], atol=1e-5)
        np.testing.assert_allclose(m.reconstruct(x)["slo"].numpy(), ref["recon_all_slo"], atol=1e-5)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(m.state_dict())
    # HF folder -> ours, and a converted model at another input size keeps its resized tables
    from mirage_edge.models import convert

    h = convert(mirage_ref / "tiny_hf", tmp_path / "hf_ours", config=mirage_ref / "tiny_config.json",
                input_size=96)
    back = create_model("mirage", checkpoint=tmp_path / "hf_ours")
    assert back.input_size == (96, 96) and back.cfg.pos_grid["bscan"] == [8, 8]
    assert torch.equal(back.input_adapters["bscan"].pos_emb, h.input_adapters["bscan"].pos_emb)


def test_non_official_size_needs_config(mirage_ref):
    with pytest.raises(CheckpointError, match="num_heads"):
        create_model("mirage", checkpoint=mirage_ref / "tiny_official.pth")
    bad = json.loads((mirage_ref / "tiny_config.json").read_text()) | {"depth": 3}
    with pytest.raises(CheckpointError, match="depth=3"):
        create_model("mirage", checkpoint=mirage_ref / "tiny_official.pth", config=bad)


def test_truncated_checkpoint(tmp_path, mirage_ref):
    data = (mirage_ref / "tiny_official.pth").read_bytes()
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        create_model("mirage", checkpoint=bad)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text((mirage_ref / "tiny_hf" / "config.json").read_text())
    weights = (mirage_ref / "tiny_hf" / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:5000])
    with pytest.raises(CheckpointError, match="safetensors"):
        create_model("mirage", checkpoint=folder)


def test_checkpoint_of_another_model(tmp_path):
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a MIRAGE checkpoint.*conv1"):
        create_model("mirage", checkpoint=path)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"global_tokens": torch.zeros(1, 1, 8)}, "args": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        create_model("mirage", checkpoint=path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CheckpointError):
        create_model("mirage", checkpoint=raw)
    assert not marker.exists()


def test_args_namespace_is_allowed(tmp_path):
    path = tmp_path / "ns.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(model="miragepre_base")}, path)
    # read fine (Namespace allow-listed), then rejected by its content
    with pytest.raises(CheckpointError, match="not a MIRAGE checkpoint"):
        create_model("mirage", checkpoint=path)


def test_weights_resolution(tmp_path, monkeypatch, mirage_ref):
    monkeypatch.setenv("MIRAGE_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIRAGE_EDGE_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        create_model("mirage-large", pretrained=True)
    msg = str(err.value)
    assert "MIRAGE_EDGE_OFFLINE" in msg and str(tmp_path / "home" / "MIRAGE-Large.pth") in msg
    assert resolve_weights(mirage_ref / "tiny_official.pth") == mirage_ref / "tiny_official.pth"
    assert resolve_weights(f"hf:{mirage_ref / 'tiny_hf'}") == mirage_ref / "tiny_hf"
    with pytest.raises(WeightsNotFoundError, match="model.safetensors"):
        resolve_weights(f"hf:{tmp_path}")
    (tmp_path / "home").mkdir()
    placed = tmp_path / "home" / "MIRAGE-Base.pth"
    placed.write_bytes(b"x")
    assert resolve_weights("mirage-base") == placed
