"""A small real-data run (issue #18 item 5): a few epochs on a few real Duke DME B-scans. The
teacher reaches a non-trivial fluid Dice on a held-out subject, and teacher, FP32 student and INT8
student are scored on the same held-out images."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SUBJECTS = {"train": ["subject01", "subject02", "subject03", "subject04"], "val": ["subject07"],
            "test": ["subject09"]}


def _subset(duke: Path, dst: Path) -> Path:
    """A RetinaBench folder of symlinks to the chosen subjects (the shared data is read-only)."""
    for split, subjects in SUBJECTS.items():
        for kind in ("bscan", "semseg"):
            (dst / split / kind).mkdir(parents=True)
            for f in sorted(duke.glob(f"*/{kind}/*.png")):
                if f.stem.rsplit("_", 1)[0] in subjects:
                    os.symlink(f, dst / split / kind / f.name)
    (dst / "INFO.json").write_text((duke / "INFO.json").read_text())
    return dst


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~2.5 CPU-minutes; much more wall time on a shared machine
def test_real_scans_teacher_learns_and_all_forms_see_the_same_images(real_data, tmp_path):
    from mirage_edge.config import from_dict
    from mirage_edge.distill import distill, load_recipe
    from mirage_edge.train.config import FinetuneConfig
    from mirage_edge.train.finetune import run_finetune

    data = _subset(real_data / "Duke_DME_fluid", tmp_path / "duke")
    # the settings of train/configs/finetune_duke_skip_cpu.toml at 128 px and a few epochs
    cfg = from_dict(FinetuneConfig, {
        "task": "seg", "data": str(data), "out_dir": str(tmp_path / "teacher"), "image_size": 128, "mode": "full",
        "ce_weight": 0.5, "dice_weight": 1.0, "class_weights": [1.0, 10.0], "augmentation": {"speckle": 0.5},
        "model": {"name": "mirage-tiny", "overrides": {"input_size": 128, "dim_tokens": 64, "depth": 2, "num_heads": 2,
                                                       "patch_size": {"bscan": [16, 16], "slo": [16, 16],
                                                                      "bscanlayermap": [4, 4]}}},
        "head": {"preds_per_patch": 64, "class_dim": 16, "depth": 1, "skip_dim": 8},
        "loop": {"epochs": 15, "batch_size": 4, "progress": False, "threads": 2, "keep_checkpoints": 1},
        "optim": {"lr": 3e-3, "weight_decay": 0.05, "warmup_steps": 4}}, source="test")
    out = run_finetune(cfg)
    # fluid is 0.10 % of subject 9's pixels: predicting fluid everywhere scores 0.002, nothing 0; 0.069 measured
    assert out["test"]["dice/Fluid"] > 0.05, out["test"]

    rec = load_recipe("tiny-demo", [
        f"data.path={json.dumps(str(data))}", f"teacher.model={json.dumps(str(tmp_path / 'teacher' / 'best'))}",
        f"cache.dir={json.dumps(str(tmp_path / 'cache'))}", f"out={json.dumps(str(tmp_path / 'run'))}",
        'stage2.mode="new_head"', 'stage2.head={type = "fpn", dim = 16}', "qat.enabled=true", "qat.epochs=1",
        "stage1.epochs=1", "stage2.epochs=2", "qat.subset_size=8", "data.image_size=128", "run.progress=false",
        "run.eval_batch_size=11"])
    test = distill(rec, log=lambda m: None).report["test"]
    held_out = [p.stem for p in sorted((data / "test" / "bscan").glob("*.png"))]
    assert test["n"] == len(held_out) == 11
    assert test["images_sha256"] == hashlib.sha256("\n".join(held_out).encode()).hexdigest()
    for form in ("teacher", "student_fp32", "student_int8_ort"):
        assert set(test[form]["per_volume_dice"]) == {"subject09"}, form
    # the teacher scored by distill is the teacher fine-tuning tested: the same images, each prediction
    # scored against the mask at its own size, so the same Dice
    assert test["teacher_value"] == pytest.approx(out["test"]["dice/Fluid"], abs=1e-6)
