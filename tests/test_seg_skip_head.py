"""The real-scan teacher's pieces (issue #18): the ConvNeXt head's image skip, fluid-weighted CE,
speckle augmentation, and the config errors around them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


def _tiny_mirage(size: int = 64):
    from mirage_edge.models import create_model

    return create_model("mirage-tiny", input_size=size, depth=1)


@pytest.mark.parametrize("levels,norm", [(1, ""), (3, ""), (3, "batch")])
def test_skip_head_round_trips_and_official_config_is_unchanged(tmp_path, levels, norm):
    from mirage_edge.models import create_model, save_model
    from mirage_edge.models.task import segmentation_model

    torch.manual_seed(0)
    plain = segmentation_model(_tiny_mirage(), 2, class_dim=8, depth=1)
    assert "skip_dim" not in plain.head.config  # official head configs stay as they were
    m = segmentation_model(_tiny_mirage(), 2, class_dim=8, depth=1, skip_dim=4, skip_levels=levels, skip_norm=norm)
    assert ("skip_levels" in m.head.config) == (levels > 1)  # one-level skip heads saved before load as they were
    assert ("skip_norm" in m.head.config) == bool(norm)
    assert hasattr(m.head, "skip_down") == (levels > 1)
    bns = [mod for mod in m.head.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) == (3 * levels if norm else 0)  # every conv of the path: 2 a level, 1 fusion a level
    x = torch.rand(2, 1, 64, 64)
    m.train()(x)  # running statistics away from their defaults, so the round trip must carry them
    m.eval()
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 2, 64, 64)
        assert m.forward_mask(x, stride=4).shape == (2, 64, 64)
        # the skip sees the image at full resolution: a one-pixel change moves the logits there
        x2 = x.clone()
        x2[:, :, 40, 40] += 0.5
        d = (m(x2) - y).abs().sum(dim=(0, 1))
        assert d[40, 40] > 0 and d[40, 40] >= d.max() * 0.1
    saved = save_model(m, tmp_path / "skip")
    assert json.loads((Path(saved) / "config.json").read_text())["head"]["skip_dim"] == 4
    again = create_model("mirage", checkpoint=saved).eval()
    with torch.no_grad():
        assert torch.equal(again(x), y)


@pytest.mark.parametrize("norm", ["", "batch"])
def test_skip_head_exports_to_onnx(tmp_path, norm):
    ort = pytest.importorskip("onnxruntime")
    from mirage_edge.models.task import segmentation_model

    torch.manual_seed(0)
    m = segmentation_model(_tiny_mirage(), 2, class_dim=8, depth=1, skip_dim=4, skip_levels=2, skip_norm=norm)
    m.train()(torch.rand(2, 1, 64, 64))
    m.eval()
    x = torch.rand(1, 1, 64, 64)
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (x,), str(path), input_names=["image"], output_names=["logits"], dynamo=False)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert abs(out - m(x).numpy()).max() < 1e-4


def test_skip_levels_need_a_skip():
    from mirage_edge.errors import ConfigError
    from mirage_edge.models.task import segmentation_model

    with pytest.raises(ConfigError, match="skip_levels must be >= 1 and needs skip_dim > 0"):
        segmentation_model(_tiny_mirage(), 2, class_dim=8, depth=1, skip_levels=2)
    with pytest.raises(ConfigError, match="skip_levels"):
        segmentation_model(_tiny_mirage(), 2, class_dim=8, depth=1, skip_dim=4, skip_levels=0)
    with pytest.raises(ConfigError, match="skip_norm must be"):
        segmentation_model(_tiny_mirage(), 2, class_dim=8, depth=1, skip_dim=4, skip_norm="layer")
    with pytest.raises(ConfigError, match="skip_norm must be"):
        segmentation_model(_tiny_mirage(), 2, class_dim=8, depth=1, skip_norm="batch")


def test_class_weights_weigh_the_cross_entropy():
    from mirage_edge.train.losses import ce_gdice_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:4, 2:4] = 1
    _, plain = ce_gdice_loss(logits, target, 1.0, 0.0)
    _, heavy = ce_gdice_loss(logits, target, 1.0, 0.0, torch.tensor([1.0, 10.0]))
    w = torch.where(target == 1, 10.0, 1.0)
    ref = (torch.nn.functional.cross_entropy(logits, target, reduction="none") * w).sum() / w.sum()
    assert torch.allclose(heavy["ce"], ref) and not torch.allclose(heavy["ce"], plain["ce"])


def test_speckle_touches_the_image_only():
    from mirage_edge.data.transforms import Augment, AugmentConfig

    g = torch.Generator().manual_seed(0)
    aug = Augment(AugmentConfig(hflip=0, affine=0, intensity=0, speckle=1.0, speckle_std=0.2), g)
    image = torch.full((1, 16, 16), 0.5)
    mask = torch.zeros(16, 16, dtype=torch.long)
    out, m = aug(image, mask)
    assert torch.equal(m, mask) and out.min() >= 0 and out.max() <= 1
    assert 0.05 < float((out - 0.5).std()) < 0.15  # 0.5 * 0.2 = 0.1
    off = Augment(AugmentConfig(hflip=0, affine=0, intensity=0), g)
    assert torch.equal(off(image), image)  # speckle is off by default


def test_bad_augmentation_and_class_weights_are_named(tmp_path):
    from mirage_edge.config import from_dict
    from mirage_edge.data.synth import synthesize
    from mirage_edge.errors import ConfigError
    from mirage_edge.train.config import FinetuneConfig
    from mirage_edge.train.finetune import run_finetune

    data = synthesize(tmp_path / "layers", "layers", 4, 1, size=32)
    base = {"task": "seg", "data": str(data), "mode": "full", "image_size": 32, "test": False,
            "model": {"name": "mirage-tiny", "overrides": {"input_size": 32, "depth": 1}},
            "head": {"class_dim": 8, "depth": 1}, "out_dir": str(tmp_path / "run"),
            "loop": {"max_steps": 1, "batch_size": 2, "progress": False, "threads": 1}}
    with pytest.raises(ConfigError, match="'augmentation'.*speckel"):
        run_finetune(from_dict(FinetuneConfig, {**base, "augmentation": {"speckel": 0.5}}, source="t"))
    with pytest.raises(ConfigError, match="'class_weights' has 2 values but .* classes"):
        run_finetune(from_dict(FinetuneConfig, {**base, "class_weights": [1.0, 5.0]}, source="t"))
