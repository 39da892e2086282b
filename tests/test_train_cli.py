"""`mirage-edge train`: bad configs fail at start with a message naming the key or path; example
configs parse. (No training here: these all stop before a model is built.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mirage_edge.cli import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "train" / "configs"


def _png(path: Path, value: int, size: int = 32) -> None:
    from mirage_edge.data.io import write_png

    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.full((size, size), value, np.uint8))


@pytest.fixture()
def cls_folder(tmp_path: Path) -> Path:
    root = tmp_path / "clsdata"
    for split in ("train", "val"):
        for c, v in (("healthy", 40), ("sick", 200)):
            for i in range(2):
                _png(root / split / c / f"{c}{i}_{split}.png", v + i)
    return root


@pytest.fixture()
def seg_folder(tmp_path: Path) -> Path:
    root = tmp_path / "segdata"
    import json

    for split in ("train", "val"):
        for i in range(2):
            _png(root / split / "bscan" / f"vol{i}_000.png", 100 + i)
            _png(root / split / "semseg" / f"vol{i}_000.png", 0)
    (root / "INFO.json").write_text(json.dumps({"0": {"value": 0, "label": "background"},
                                                "1": {"value": 1, "label": "layer"}}))
    return root


def run(*args: str):
    result = CliRunner().invoke(cli, ["train", *args])
    text = result.output + (getattr(result, "stderr", "") or "")
    return result.exit_code, text


def test_unknown_override_key_names_it(cls_folder):
    code, out = run("finetune", "--task", "cls", "--data", str(cls_folder), "loop.epoch=3")
    assert code == 2 and "loop.epoch" in out and "epochs" in out  # suggestion


def test_unknown_key_in_file_names_key_and_file(tmp_path, cls_folder):
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "cls"\n[optim]\nlearning_rate = 0.1\n')
    code, out = run("finetune", "--config", str(bad), "--data", str(cls_folder))
    assert code == 2 and "optim.learning_rate" in out and "bad.toml" in out


def test_wrong_type_names_key(cls_folder):
    code, out = run("finetune", "--task", "cls", "--data", str(cls_folder), 'loop.epochs="ten"')
    assert code == 2 and "loop.epochs" in out and "integer" in out


def test_bad_value_names_key(cls_folder):
    code, out = run("finetune", "--task", "cls", "--data", str(cls_folder), "loop.batch_size=0")
    assert code == 2 and "loop.batch_size" in out


def test_missing_data_dir_names_path(tmp_path):
    missing = tmp_path / "nope"
    code, out = run("finetune", "--task", "seg", "--data", str(missing))
    assert code != 0 and str(missing) in out and "'data'" in out


def test_data_not_set(tmp_path):
    code, out = run("pretrain", "--model", "mirage-tiny")
    assert code != 0 and "data.dir" in out


def test_seg_on_cls_folder_fails_naming_both(cls_folder):
    code, out = run("finetune", "--task", "seg", "--data", str(cls_folder))
    assert code != 0 and str(cls_folder) in out and "classification" in out and "'seg'" in out


def test_cls_on_seg_folder_fails(seg_folder):
    code, out = run("finetune", "--task", "cls", "--data", str(seg_folder))
    assert code != 0 and str(seg_folder) in out and "segmentation" in out


def test_pretrain_on_cls_folder_fails(cls_folder):
    code, out = run("pretrain", "--data", str(cls_folder))
    assert code != 0 and str(cls_folder) in out and "multimodal" in out


def test_mode_task_mismatch(cls_folder):
    code, out = run("finetune", "--task", "cls", "--data", str(cls_folder), "--mode", "frozen")
    assert code == 2 and "frozen" in out


def test_cuda_device_without_cuda_is_a_clear_error(cls_folder, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from mirage_edge.errors import ConfigError
    from mirage_edge.train.distributed import resolve_device

    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"


def test_missing_checkpoint_names_path(cls_folder, tmp_path):
    code, out = run("finetune", "--task", "cls", "--data", str(cls_folder), "--checkpoint",
                    str(tmp_path / "missing_ckpt"))
    assert code != 0 and "missing_ckpt" in out


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_parse(path):
    from mirage_edge.config import load, read_config
    from mirage_edge.train.config import FinetuneConfig, PretrainConfig

    cls = PretrainConfig if path.name.startswith("pretrain") else FinetuneConfig
    cfg = load(cls, path)
    if cls is FinetuneConfig:
        assert cfg.task == read_config(path)["task"]
    assert cfg.loop.device in ("cpu", "cuda")
