"""Parity with the official MIRAGE code: every reference array of the tiny fixtures within 1e-5."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mirage_edge.models import create_model
from mirage_edge.models.checkpoint import remap_official_seg, torch_load_safe
from mirage_edge.models.heads import ConvNeXtSegHead
from mirage_edge.models.losses import masked_loss, masked_loss_per_sample
from mirage_edge.models.pos_embed import build_sincos_pos_embed
from mirage_edge.models.task import SegmentationModel

ATOL = 1e-5
MODS = ("bscan", "slo", "bscanlayermap")


@pytest.fixture(scope="module")
def ref(mirage_ref):
    return np.load(mirage_ref / "tiny_reference.npz")


@pytest.fixture(scope="module")
def tiny(mirage_ref):
    return create_model("mirage", checkpoint=mirage_ref / "tiny_official.pth",
                        config=mirage_ref / "tiny_config.json").eval()


def t(ref, key):
    return torch.from_numpy(ref[key])


def close(out: torch.Tensor, expected: np.ndarray, atol: float = ATOL) -> None:
    got = out.detach().double().numpy()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, atol=atol, rtol=0)


def inputs(ref, names=MODS):
    return {m: t(ref, f"input_{m}") for m in names}


def test_pos_tables_are_the_sincos_formula(mirage_ref):
    sd = torch_load_safe(mirage_ref / "tiny_official.pth")["model"]
    assert torch.equal(build_sincos_pos_embed((8, 8), 64), sd["input_adapters.bscan.pos_emb"])
    assert torch.equal(build_sincos_pos_embed((8, 8), 32), sd["output_adapters.slo.pos_emb"])


@torch.no_grad()
def test_tokens_and_adapters(tiny, ref):
    close(tiny.forward_features(inputs(ref)), ref["tokens_all"])
    emb = tiny.embed_inputs(inputs(ref))
    for m in MODS:
        close(emb[m], ref[f"adapter_{m}"])
    subsets = [("tokens_bscan", ("bscan",)), ("tokens_slo", ("slo",)), ("tokens_bscan_slo", ("bscan", "slo"))]
    for key, names in subsets:
        close(tiny.forward_features(inputs(ref, names)), ref[key])
    # a plain tensor is the B-scan
    close(tiny.forward_features(t(ref, "input_bscan")), ref["tokens_bscan"])


@torch.no_grad()
def test_intermediates(tiny, ref):
    blocks = tiny.forward_intermediates(inputs(ref), [0, 1])
    close(blocks[0], ref["intermediate_blocks_all"][0])
    close(blocks[1], ref["tokens_all"])


@torch.no_grad()
@pytest.mark.parametrize("size,key", [(96, "bscan_96x96"), ((64, 96), "bscan_64x96")])
def test_other_input_sizes(mirage_ref, ref, tiny, size, key):
    m = create_model("mirage", checkpoint=mirage_ref / "tiny_official.pth",
                     config=mirage_ref / "tiny_config.json", input_size=size).eval()
    close(m.forward_features(t(ref, f"input_{key}_bscan")), ref[f"tokens_{key}"])
    # regenerated tables (set_input_size) give the same numbers as resizing the checkpoint tables
    import copy

    m2 = copy.deepcopy(tiny).set_input_size(size)
    close(m2.forward_features(t(ref, f"input_{key}_bscan")), ref[f"tokens_{key}"])


@torch.no_grad()
def test_all_modalities_96(mirage_ref, ref):
    m = create_model("mirage", checkpoint=mirage_ref / "tiny_official.pth",
                     config=mirage_ref / "tiny_config.json", input_size=96).eval()
    x = {mod: t(ref, f"input_all_96x96_{mod}") for mod in MODS}
    close(m.forward_features(x), ref["tokens_all_96x96"])


@torch.no_grad()
def test_reconstructions(tiny, ref):
    rec = tiny.reconstruct(inputs(ref))
    for m in MODS:
        close(rec[m], ref[f"recon_all_{m}"])
    rec = tiny.reconstruct(inputs(ref, ("bscan",)))
    for m in MODS:
        close(rec[m], ref[f"recon_bscan_{m}"])


@torch.no_grad()
def test_masked_forward_and_losses(tiny, ref):
    x = inputs(ref)
    masks = {m: t(ref, f"mask_{m}") for m in MODS}
    enc = tiny.encode_masked(x, masks)
    n = int(ref["masked_tokens_len"][0])
    assert (ref["masked_tokens_len"] == n).all() and enc.tokens.shape[1] == n
    close(enc.tokens, ref["masked_tokens"][:, :n])
    preds, out_masks = tiny.forward_masked(x, masks)
    for m in MODS:
        close(preds[m], ref[f"masked_recon_{m}"])
        assert torch.equal(out_masks[m], masks[m])
        kind = "ce" if m == "bscanlayermap" else "mse"
        per = masked_loss_per_sample(preds[m], x[m], out_masks[m], tiny.cfg.grid(m),
                                     tuple(tiny.cfg.patch_size[m]), kind)
        close(per, ref[f"masked_loss_{m}"])
    total, parts = masked_loss(preds, x, out_masks, tiny.cfg)
    for m in MODS:
        close(parts[m].reshape(1), ref[f"masked_loss_batch_{m}"])
    close(total.reshape(1), ref["masked_loss_total"])


@torch.no_grad()
def test_segmentation_head(mirage_ref, ref):
    enc = create_model("mirage", checkpoint=mirage_ref / "tiny_official.pth",
                       config=mirage_ref / "tiny_config.json", input_size=128).eval()
    close(enc.forward_features(t(ref, "seg_input_bscan")), ref["seg_tokens"])
    import json

    sh = json.loads((mirage_ref / "tiny_config.json").read_text())["seg_head"]
    head = ConvNeXtSegHead(64, sh["num_classes"], sh["preds_per_patch"], sh["class_dim"], sh["depth"],
                           sh["interpolate_mode"])
    sd = remap_official_seg(torch_load_safe(mirage_ref / "tiny_seg_convnext.pth")["model"])
    assert all(k.startswith("head.") for k in sd)
    head.load_state_dict({k[len("head."):]: v for k, v in sd.items()}, strict=True)
    seg = SegmentationModel(enc, head).eval()
    close(seg(t(ref, "seg_input_bscan")), ref["seg_logits"])


@torch.no_grad()
def test_hf_layout(mirage_ref):
    hf = np.load(mirage_ref / "tiny_hf" / "reference.npz")
    cfg = mirage_ref / "tiny_config.json"
    m = create_model("mirage", checkpoint=mirage_ref / "tiny_hf", config=cfg).eval()
    assert m.cfg.in_domains == ["bscan", "slo"] and m.output_adapters is None
    b, s = t(hf, "input_bscan"), t(hf, "input_slo")
    close(m.forward_features({"bscan": b, "slo": s}), hf["tokens_bscan_slo"])
    close(m.forward_features({"slo": s, "bscan": b}), hf["tokens_slo_bscan"])
    close(m.forward_features({"bscan": b}), hf["tokens_bscan"])
    close(m.forward_features({"slo": s}), hf["tokens_slo"])
    for key, size in [("bscan_96x96", 96), ("bscan_64x96", (64, 96))]:
        m2 = create_model("mirage", checkpoint=mirage_ref / "tiny_hf", config=mirage_ref / "tiny_config.json",
                          input_size=size).eval()
        close(m2.forward_features(t(hf, f"input_{key}")), hf[f"tokens_{key}"])
