"""Masked multimodal pretraining: the reconstruction loss falls, modality subsets work, official init."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

TINY = {"input_size": 64, "patch_size": {"bscan": [16, 16], "slo": [16, 16], "bscanlayermap": [4, 4]}}


@pytest.fixture(scope="module")
def mm_data(tmp_path_factory) -> Path:
    from mirage_edge.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("mm") / "mm", "multimodal", 12, 0, size=64)


def _cfg(data: Path, out: Path, *overrides: str):
    from mirage_edge.config import load
    from mirage_edge.train.config import PretrainConfig

    base = {"out_dir": str(out), "model": {"name": "mirage-tiny", "overrides": TINY},
            "data": {"dir": str(data)},
            "loop": {"epochs": 200, "batch_size": 8, "log_every": 2, "progress": False, "threads": 2,
                     "eval_every": 6, "checkpoint_every": 12},
            "optim": {"lr": 2e-3, "warmup_steps": 2}}
    return load(PretrainConfig, None, overrides, base=base)


def _train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "train"]


def test_pretrain_tiny_loss_falls_and_checkpoint_loads(mm_data, tmp_path):
    from mirage_edge.models import create_model
    from mirage_edge.train.pretrain import run_pretrain

    res = run_pretrain(_cfg(mm_data, tmp_path / "run", "loop.max_steps=24"))
    losses = _train_losses(tmp_path / "run")
    assert res.steps == 24 and len(losses) == 12
    # falls clearly: last window well below the first (layer-map CE ~ln 13 at start)
    assert losses[-1] < 0.75 * losses[0], losses
    assert res.best_dir is not None  # the synthetic set has a val split -> val_loss monitored
    m = create_model("mirage", checkpoint=res.best_dir)
    assert sorted(m.output_adapters) == ["bscan", "bscanlayermap", "slo"]


def test_pretrain_modality_subset(mm_data, tmp_path):
    from mirage_edge.models import create_model
    from mirage_edge.train.pretrain import run_pretrain

    res = run_pretrain(_cfg(mm_data, tmp_path / "run", "loop.max_steps=4",
                            'data.modalities=["bscan", "bscanlayermap"]', "masking.num_encoded_tokens=8"))
    m = create_model("mirage", checkpoint=res.last_dir)
    assert list(m.cfg.in_domains) == ["bscan", "bscanlayermap"] and sorted(m.output_adapters) == [
        "bscan", "bscanlayermap"]
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if r["event"] == "train"]
    assert "bscanlayermap" in train[0] and "slo" not in train[0]


def test_pretrain_from_official_checkpoint(mm_data, tmp_path, mirage_ref):
    from mirage_edge.train.pretrain import run_pretrain

    cfg = _cfg(mm_data, tmp_path / "run", "loop.max_steps=2", "model.name=mirage",
               f"model.checkpoint={json.dumps(str(mirage_ref / 'tiny_official.pth'))}",
               f"model.config={json.dumps(str(mirage_ref / 'tiny_config.json'))}",
               "model.overrides={}")
    res = run_pretrain(cfg)
    assert res.steps == 2
    state = json.loads((res.last_dir / "config.json").read_text())
    assert state["encoder"]["architecture"]["dim_tokens"] == 64  # the fixture's width, not tiny's


def test_bf16_autocast_step():
    """One masked step and one fine-tuning step under bf16 autocast on CPU (the GPU path's dtypes)."""
    from mirage_edge.models import create_model
    from mirage_edge.models.task import segmentation_model
    from mirage_edge.train.distributed import autocast
    from mirage_edge.train.finetune import as_bscan_encoder
    from mirage_edge.train.losses import ce_gdice_loss
    from mirage_edge.train.pretrain import MaskedAutoencoder

    torch.manual_seed(0)
    m = create_model("mirage-tiny", input_size=64, depth=1)
    inputs = {"bscan": torch.rand(2, 1, 64, 64), "slo": torch.rand(2, 1, 64, 64),
              "bscanlayermap": torch.randint(0, 13, (2, 16, 16))}
    with autocast(torch.device("cpu"), torch.bfloat16):
        loss, parts = MaskedAutoencoder(m, 4, 1.0)(inputs)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and set(parts) == set(inputs)
    seg = segmentation_model(as_bscan_encoder(m, 64), 3, class_dim=8, depth=1)
    with autocast(torch.device("cpu"), torch.bfloat16):
        loss, _ = ce_gdice_loss(seg(torch.rand(2, 1, 64, 64)), torch.randint(0, 3, (2, 64, 64)))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "train" / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_train_config_loads(path):
    """Each train/configs/*.toml builds its config strictly (unknown keys and wrong types fail), so a
    documented command does not die on a typo in the file it names."""
    from mirage_edge import config as C
    from mirage_edge.train.config import FinetuneConfig, PretrainConfig, finetune_base

    if path.name.startswith("pretrain_"):
        cfg = C.load(PretrainConfig, path)
        assert cfg.data.modalities
    else:
        task = C.read_config(path).get("task")
        cfg = C.load(FinetuneConfig, path, base=finetune_base(task))
        assert cfg.loop.epochs > 0
