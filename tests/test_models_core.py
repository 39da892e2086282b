"""Registry, factory, mirage-tiny forward paths, heads, task models and our checkpoint format."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mirage_edge import create_model
from mirage_edge.errors import ConfigError, InputError, ModelNotFoundError
from mirage_edge.models import (ClassificationModel, ClsHead, ConvNeXtSegHead, SegmentationModel,
                                list_models, register_model, save_model)
from mirage_edge.models.masking import sample_task_masks
from mirage_edge.models.task import classification_model, segmentation_model

torch.set_num_threads(2)
SMALL = dict(input_size=128)  # mirage-tiny at 128x128: 4x4 tokens per modality, fast


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("mirage-tiny", **SMALL).eval()


def test_registry_lists_and_suggests():
    assert {"mirage-tiny", "mirage-base", "mirage-large"} <= set(list_models("mirage-*"))
    with pytest.raises(ModelNotFoundError, match="mirage-large"):
        create_model("mirage-larg")
    with pytest.raises(ConfigError, match="checkpoint"):
        create_model("mirage")


def test_register_model_generic():
    class Toy(nn.Module):
        def __init__(self, width: int = 3):
            super().__init__()
            self.lin = nn.Linear(width, width)

    @register_model(name="toy-test-model")
    def toy(pretrained: bool = False, **kwargs):
        return Toy(**kwargs)

    m = create_model("toy-test-model", width=5)
    assert isinstance(m, Toy) and m.lin.in_features == 5
    assert m.mirage_edge_spec == {"name": "toy-test-model", "kwargs": {"width": 5}}
    assert "toy-test-model" in list_models("toy-*")


def test_tiny_size_and_shapes(tiny):
    full = create_model("mirage-tiny", device="meta")
    assert (full.cfg.dim_tokens, full.cfg.depth, full.cfg.num_heads) == (192, 4, 3)
    assert full.input_size == (512, 512) and full.patch_size == (32, 32)
    assert full.cfg.input_size["bscanlayermap"] == [128, 128]
    assert full.cfg.patch_size["bscanlayermap"] == [8, 8]
    x = torch.rand(2, 1, 128, 128)
    lm = torch.randint(0, 13, (2, 32, 32))
    with torch.no_grad():
        assert tiny.forward_features(x).shape == (2, 17, 192)
        out = tiny.forward_features({"slo": x, "bscanlayermap": lm, "bscan": x})
    assert out.shape == (2, 49, 192)
    assert tiny.embed_dim == 192 and tiny.num_global_tokens == 1 and tiny.token_grid(128, 128) == (4, 4)


@torch.no_grad()
def test_token_order_follows_dict_order(tiny):
    x, s = torch.rand(1, 1, 128, 128), torch.rand(1, 1, 128, 128)
    a = tiny.forward_features({"bscan": x, "slo": s})
    b = tiny.forward_features({"slo": s, "bscan": x})
    torch.testing.assert_close(a[:, :16], b[:, 16:32], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[:, -1], b[:, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_intermediates_indices(tiny):
    x = torch.rand(1, 1, 128, 128)
    outs = tiny.forward_intermediates(x, 2)
    assert len(outs) == 2
    torch.testing.assert_close(outs[-1], tiny.forward_features(x))
    last, first = tiny.forward_intermediates(x, [-1, 0])
    torch.testing.assert_close(last, outs[-1])
    assert not torch.equal(first, last)
    with pytest.raises(InputError):
        tiny.forward_intermediates(x, [7])


def test_random_masking_counts():
    g = torch.Generator().manual_seed(0)
    masks = sample_task_masks(64, {"bscan": 16, "slo": 16, "bscanlayermap": 16}, 10, 1.0, g)
    vis = sum((m == 0).sum(1) for m in masks.values())
    assert (vis == 10).all()
    per_mod = torch.stack([(m == 0).sum(1) for m in masks.values()], 1).float()
    assert (per_mod.std(0) > 0).all()  # Dirichlet shares vary between samples
    again = sample_task_masks(64, {"bscan": 16, "slo": 16, "bscanlayermap": 16}, 10, 1.0,
                              torch.Generator().manual_seed(0))
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_masked_forward_trains(tiny):
    from mirage_edge.models.losses import masked_loss

    m = create_model("mirage-tiny", **SMALL)
    x = {"bscan": torch.rand(2, 1, 128, 128), "slo": torch.rand(2, 1, 128, 128),
         "bscanlayermap": torch.randint(0, 13, (2, 32, 32))}
    preds, masks = m.forward_masked(x, num_encoded_tokens=12, generator=torch.Generator().manual_seed(1))
    assert preds["bscanlayermap"].shape == (2, 13, 32, 32) and preds["bscan"].shape == (2, 1, 128, 128)
    assert all(int(sum((mk[i] == 0).sum() for mk in masks.values())) == 12 for i in range(2))
    total, parts = masked_loss(preds, x, masks, m.cfg)
    total.backward()
    assert m.encoder[0].attn.qkv.weight.grad is not None and torch.isfinite(total)
    with pytest.raises(InputError, match="same"):
        bad = {k: torch.zeros(2, 16, dtype=torch.long) for k in x}
        bad["bscan"][0, 0] = 1
        m.forward_masked(x, task_masks=bad)


class FakeCNN(nn.Module):
    """A student-like encoder: implements only the documented protocol, no global token."""

    embed_dim, num_global_tokens = 8, 0

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 16, 16)

    def token_grid(self, h, w):
        return h // 16, w // 16

    def forward_features(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


def _tiny_encoder():
    return create_model("mirage-tiny", out_domains=[], **SMALL)


@pytest.mark.parametrize("make_encoder", [_tiny_encoder, FakeCNN], ids=["mirage-tiny", "fake-cnn"])
def test_task_models_any_encoder(make_encoder):
    enc = make_encoder()
    x = torch.rand(2, 1, 128, 128)
    seg = segmentation_model(enc, 3, preds_per_patch=4, class_dim=8, depth=1).eval()
    assert seg(x).shape == (2, 3, 128, 128)
    cls = classification_model(enc, 4).eval()
    assert cls(x).shape == (2, 4)
    with pytest.raises(InputError):
        cls(torch.rand(2, 3, 128, 128))


def test_cls_pools(tiny):
    x = torch.rand(2, 1, 128, 128)
    for pool in ClsHead.POOLS:
        assert ClassificationModel(tiny, ClsHead(192, 3, pool))(x).shape == (2, 3)
    with pytest.raises(ConfigError):
        ClassificationModel(FakeCNN(), ClsHead(8, 3, "cls"))
    with pytest.raises(ConfigError):
        ClsHead(8, 3, "max")


def test_cls_head_global_pool_matches_manual(tiny):
    head = ClsHead(192, 3, "global")
    toks = torch.randn(2, 17, 192)
    expect = head.fc(nn.functional.layer_norm(toks[:, :16], (192,), eps=1e-6).mean(1))
    torch.testing.assert_close(head(toks[:, :16], toks[:, 16:]), expect)


@pytest.mark.parametrize("kind", ["encoder", "segmentation", "classification", "student"])
def test_save_and_load_round_trip(tmp_path, tiny, kind):
    torch.manual_seed(1)
    if kind == "encoder":
        model = tiny
    elif kind == "segmentation":
        model = SegmentationModel(tiny, ConvNeXtSegHead(192, 3, preds_per_patch=4, class_dim=8, depth=1))
    elif kind == "classification":
        model = ClassificationModel(tiny, ClsHead(192, 5, "token_mix"))
    else:
        @register_model(name="fake-cnn-test")
        def fake(pretrained=False, **kw):
            return FakeCNN()
        model = ClassificationModel(create_model("fake-cnn-test"), ClsHead(8, 2))
    model.eval()
    out = save_model(model, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "mirage-edge" and cfg["kind"] == ("encoder" if kind == "encoder" else model.task)
    back = create_model("mirage", checkpoint=out).eval()
    assert type(back) is type(model)
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        a = model(x) if kind != "encoder" else model.forward_features(x)
        b = back(x) if kind != "encoder" else back.forward_features(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not list(out.glob("*.tmp"))


def test_create_from_config_dict_and_file(tmp_path, mirage_ref):
    cfg = json.loads((mirage_ref / "tiny_config.json").read_text())
    m = create_model("mirage", config=cfg)
    assert m.cfg.dim_tokens == 64 and m.cfg.depth == 2 and m.cfg.decoder_dim == 32
    m2 = create_model("mirage", config=mirage_ref / "tiny_config.json", input_size=96)
    assert m2.input_size == (96, 96) and m2.cfg.input_size["bscanlayermap"] == [24, 24]
    with pytest.raises(ConfigError, match="dim_token"):
        create_model("mirage", config={"dim_token": 64})


def test_input_errors(tiny):
    with pytest.raises(InputError, match="unknown modality 'oct'"):
        tiny.forward_features({"oct": torch.rand(1, 1, 128, 128)})
    with pytest.raises(InputError, match="not a multiple of the patch"):
        tiny.forward_features(torch.rand(1, 1, 100, 128))
    with pytest.raises(InputError, match="differs from the model's input size"):
        tiny.forward_features(torch.rand(1, 1, 64, 64))
    with pytest.raises(InputError, match="1 channel"):
        tiny.forward_features(torch.rand(1, 3, 128, 128))
    with pytest.raises(InputError, match="int64"):
        tiny.forward_features({"bscanlayermap": torch.rand(1, 32, 32)})
    with pytest.raises(InputError, match="values must be in 0..12"):
        tiny.forward_features({"bscan": torch.rand(1, 1, 128, 128),
                               "bscanlayermap": torch.full((1, 32, 32), 13)})
    with pytest.raises(InputError, match="batch sizes differ"):
        tiny.forward_features({"bscan": torch.rand(1, 1, 128, 128), "slo": torch.rand(2, 1, 128, 128)})


def test_models_package_import_is_torch_free():
    from conftest import run_without_torch

    res = run_without_torch(
        "import mirage_edge.models as m, mirage_edge.models.cli, mirage_edge.models.weights\n"
        "print(m.register_model.__name__)"
    )
    assert res.returncode == 0, res.stderr


def test_masking_alphas_and_per_modality_sizes():
    g = torch.Generator().manual_seed(3)
    # a strongly skewed Dirichlet puts (almost) every visible token in the first modality
    masks = sample_task_masks(32, {"bscan": 16, "slo": 16}, 8, [50.0, 0.01], g)
    vis_b = (masks["bscan"] == 0).sum(1).float().mean()
    assert vis_b > 7 and all(m.dtype == torch.long for m in masks.values())
    m = create_model("mirage-tiny", device="meta", input_size={"bscan": [64, 96], "slo": [64, 96],
                                                                "bscanlayermap": [16, 24]})
    assert m.cfg.grid("bscanlayermap") == (2, 3) and m.input_adapters["bscan"].pos_emb.shape[-2:] == (2, 3)


def test_partial_per_modality_override_updates_the_size_table():
    from mirage_edge.errors import ConfigError
    from mirage_edge.models import create_model

    enc = create_model("mirage-tiny", input_size=128, in_domains=["bscan"], out_domains=[],
                       patch_size={"bscan": [16, 16]})
    assert enc.cfg.patch_size["bscan"] == [16, 16] and enc.token_grid(128, 128) == (8, 8)
    assert enc.cfg.patch_size["slo"] == create_model("mirage-tiny", device="meta").cfg.patch_size["slo"]
    with pytest.raises(ConfigError, match="same token grid"):
        create_model("mirage-tiny", input_size=128, patch_size={"bscan": [16, 16]})
