"""The labels-only twin (`distill --baseline`): no teacher, same images in the same order, same start,
and a KD gain that is the difference of the two evaluated metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_seg_teacher
from test_distill_pipeline import FAST

from mirage_edge.distill.recipe import load_recipe

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
    """A synthetic layers set (64 px) and a 'fine-tuned' (random) mirage-tiny segmentation teacher."""
    root = tmp_path_factory.mktemp("baseline")
    return (root, *tiny_seg_teacher(root))


def test_twin_needs_no_teacher_sees_the_same_batches_and_gives_the_kd_gain(seg_setup, monkeypatch):
    from click.testing import CliRunner

    from mirage_edge.distill import evaluate as ev
    from mirage_edge.distill import loop, load_student
    from mirage_edge.distill.cli import distill_cmd
    from mirage_edge.distill.teacher import Teacher

    root, data, teacher = seg_setup
    batches: dict[str, list[list[int]]] = {}
    starts: dict[str, dict[str, torch.Tensor]] = {}
    real_run_stage, real_targets = loop.run_stage, Teacher.targets
    unavailable = {"on": False}

    def no_teacher(*a, **k):
        if unavailable["on"]:
            raise RuntimeError("the teacher is unavailable while the twin trains")
        return real_targets(*a, **k)

    def spy_stage(name, model, loss_fn, ds, *a, **k):
        enc = getattr(model, "encoder", model)
        starts[name] = {n: v.clone() for n, v in enc.state_dict().items()}

        def recording(m, batch):
            batches.setdefault(name, []).append(batch["index"].tolist())
            return loss_fn(m, batch)

        unavailable["on"] = name.startswith("baseline")
        try:
            return real_run_stage(name, model, recording, ds, *a, **k)
        finally:
            unavailable["on"] = False

    def forward_guard(module, args):
        if unavailable["on"]:
            raise RuntimeError("the teacher model ran while the twin trained")

    real_build = loop.build_teacher

    def guarded_build(*a, **k):
        t = real_build(*a, **k)
        t.model.register_forward_pre_hook(forward_guard)
        return t

    monkeypatch.setattr(loop, "run_stage", spy_stage)
    monkeypatch.setattr(Teacher, "targets", no_teacher)
    monkeypatch.setattr(loop, "build_teacher", guarded_build)
    out = root / "run"
    args = ["--recipe", "tiny-demo", "--data", str(data), "--teacher", str(teacher), "--out", str(out), "--qat",
            "--baseline", f"cache.dir={json.dumps(str(root / 'cache'))}", *FAST]
    res = CliRunner().invoke(distill_cmd, args)
    assert res.exit_code == 0, res.output
    assert "labels-only twin" in res.output and "KD gain" in res.output

    assert {"stage1", "stage2", "baseline_stage"} <= set(batches)
    # QAT of the twin runs too (with the twin's own FP32 model as its KD target)
    assert (out / "baseline_qat" / "DONE.json").is_file()
    # same images in the same order: the twin's first epoch is stage 2's epoch (same seed, batch size)
    assert batches["baseline_stage"][:len(batches["stage2"])] == batches["stage2"]
    assert len(batches["baseline_stage"]) == 2 * len(batches["stage2"])  # epochs = stage1 + stage2
    # same initial backbone + projector weights as the distilled student
    for k, v in starts["stage1"].items():
        assert torch.equal(v, starts["baseline_stage"][k]), k

    report = json.loads((out / "report.json").read_text())
    test = report["test"]
    assert report["recipe"] and (out / "baseline" / "config.json").is_file()
    meta = json.loads((out / "baseline" / "config.json").read_text())["meta"]
    assert meta["labels_only"] is True and meta["teacher"] is None
    # the KD gain is the difference of the two metrics, each re-evaluated from the saved models
    rec = load_recipe(out / "recipe.toml")
    t = loop.build_teacher(rec, lambda m: None)
    _, _, test_ds, _, _ = loop._datasets(rec, t)
    values = {}
    for name in ("student", "baseline"):
        logits, labels = ev.collect(test_ds, load_student(out / name), 8)
        values[name] = ev.headline("segmentation", ev.task_metrics("segmentation", logits, labels, test_ds))[1]
    assert values["student"] == pytest.approx(test["student_value"], abs=1e-6)
    assert values["baseline"] == pytest.approx(test["baseline_value"], abs=1e-6)
    assert test["kd_gain_points"] == pytest.approx(100 * (values["student"] - values["baseline"]), abs=1e-4)
    lo, hi = test["kd_gain_ci95_points"]
    assert lo <= hi and test["ci_unit"] == "B-scan"
    assert test["kd_gain_int8_points"] == pytest.approx(
        100 * (test["int8_value"] - test["baseline_int8_value"]), abs=1e-6)
    assert (out / "baseline_int8" / "model.onnx").is_file()
    # what to ship is decided on validation, from the two stages' best val metrics
    pick, st = report["validation"], report["stages"]
    assert (pick["distilled"], pick["baseline"]) == (st["stage2"]["best"], st["baseline"]["best"])
    assert pick["ship"] == ("baseline" if pick["baseline"] > pick["distilled"] else "student")
    assert f"validation: distilled {pick['distilled']:.4f}" in res.output


def test_the_students_start_does_not_depend_on_the_teachers_architecture(seg_setup, monkeypatch):
    """The student and its twin start from weights drawn after a re-seed: a teacher with more parameters
    (whose construction draws more random numbers before its weights load) gives the same start, so
    the twin of one seed is the same model whichever teacher the run distils."""
    from click.testing import CliRunner

    from mirage_edge.distill import loop
    from mirage_edge.distill.cli import distill_cmd
    from mirage_edge.models import create_model, save_model
    from mirage_edge.models.task import segmentation_model

    root, data, teacher = seg_setup
    torch.manual_seed(1)
    enc = create_model("mirage-tiny", input_size=64, depth=2, in_domains=["bscan"], out_domains=[])
    save_model(segmentation_model(enc, 9, class_dim=16, depth=2), root / "teacher-deeper")
    starts = []

    class Stop(Exception):
        pass

    def first_stage(name, model, *a, **k):
        starts.append({n: v.clone() for n, v in getattr(model, "encoder", model).state_dict().items()})
        raise Stop

    monkeypatch.setattr(loop, "run_stage", first_stage)
    for i, t in enumerate((teacher, root / "teacher-deeper")):
        args = ["--recipe", "tiny-demo", "--data", str(data), "--teacher", str(t), "--out", str(root / f"start{i}"),
                f"cache.dir={json.dumps(str(root / 'cache'))}", *FAST]
        res = CliRunner().invoke(distill_cmd, args)
        assert isinstance(res.exception, Stop), res.output
    assert starts[0].keys() == starts[1].keys()
    for k in starts[0]:
        assert torch.equal(starts[0][k], starts[1][k]), k


def test_twin_is_skipped_without_a_task_head(seg_setup):
    """An encoder-only teacher has no head type to copy: the twin is skipped, said in the log."""
    from mirage_edge.distill import distill

    root, data, _ = seg_setup
    logs: list[str] = []
    rec = load_recipe("tiny-demo", [f"data.path={json.dumps(str(data))}", "teacher.random_weights=true",
                                    f"cache.dir={json.dumps(str(root / 'cache'))}", "baseline.enabled=true",
                                    f"out={json.dumps(str(root / 'run_enc'))}", *FAST, "stage2.epochs=0"])
    res = distill(rec, log=logs.append)
    assert any("baseline skipped" in m for m in logs)
    assert not (Path(res.out_dir) / "baseline").exists()


def test_paired_bootstrap_matches_the_metric_and_is_zero_for_equal_models():
    from mirage_edge import metrics

    rng = np.random.default_rng(0)
    target = (rng.random((12, 16, 16)) < 0.2).astype(np.int64)
    good = np.where(rng.random(target.shape) < 0.9, target, 1 - target)
    bad = np.where(rng.random(target.shape) < 0.6, target, 1 - target)
    vols = ["a"] * 6 + ["b"] * 6
    r = metrics.paired_bootstrap("segmentation", good, bad, target, vols, 2, (0,), n_boot=500)
    ref = metrics.segmentation_metrics(good, target, vols, 2, compute_hd95=False)["dice"]
    assert r["a"] == pytest.approx(ref, abs=1e-9)
    assert r["diff"] == pytest.approx(r["a"] - r["b"]) and r["diff_ci"][0] > 0  # clearly better
    assert r["a_ci"][0] <= r["a"] <= r["a_ci"][1]
    same = metrics.paired_bootstrap("segmentation", good, good, target, vols, 2, (0,), n_boot=200)
    assert same["diff_ci"] == [0.0, 0.0]

    from sklearn.metrics import balanced_accuracy_score

    y = rng.integers(0, 3, 90)
    pa = np.where(rng.random(90) < 0.8, y, (y + 1) % 3)
    pb = np.where(rng.random(90) < 0.5, y, (y + 1) % 3)
    c = metrics.paired_bootstrap("classification", pa, pb, y, n_boot=500)
    assert c["a"] == pytest.approx(balanced_accuracy_score(y, pa)) and c["unit"] == "image"
    assert c["diff_ci"][0] > 0


def test_presence_auroc():
    from mirage_edge import metrics

    target = np.zeros((4, 8, 8), np.int64)
    target[0, 2, 2] = target[1, 3, 3] = 1
    probs = np.zeros((4, 2, 8, 8))
    probs[:, 1] = np.array([0.9, 0.8, 0.1, 0.7])[:, None, None]  # B-scan 3 is a false positive, ranked last
    probs[:, 0] = 1 - probs[:, 1]
    assert metrics.presence_auroc(probs, target, [1]) == {1: 1.0}
    assert metrics.presence_auroc(probs, np.ones_like(target), [1]) == {}


def test_kd_weight_chosen_on_validation(seg_setup):
    """stage2.alpha_grid: one stage 2 per KD weight from the same stage-1 weights; the best val metric wins."""
    from safetensors.torch import load_file

    from mirage_edge.distill import distill
    from mirage_edge.errors import ConfigError

    root, data, teacher = seg_setup
    rec = load_recipe("tiny-demo", [f"data.path={json.dumps(str(data))}", f"teacher.model={json.dumps(str(teacher))}",
                                    f"cache.dir={json.dumps(str(root / 'cache'))}", "stage2.alpha_grid=[0.0, 0.9]",
                                    f"out={json.dumps(str(root / 'run_grid'))}", *FAST])
    res = distill(rec, log=lambda m: None)
    s2 = res.report["stages"]["stage2"]
    assert set(s2["alpha_search"]) == {"0", "0.9"}
    best = max(s2["alpha_search"], key=lambda a: s2["alpha_search"][a])
    assert f"{s2['alpha']:g}" == best or s2["alpha_search"]["0"] == s2["alpha_search"]["0.9"]
    chosen = load_file(str(res.out_dir / f"stage2_alpha{s2['alpha']:g}" / "final.safetensors"))
    from mirage_edge.models import create_model

    saved = create_model("mirage", checkpoint=res.student_dir).state_dict()
    key = next(k for k in chosen if k.endswith("weight") and "head" in k)
    assert torch.equal(chosen[key], saved[key])
    with pytest.raises(ValueError, match="alpha_grid"):
        load_recipe("tiny-demo", ["stage2.alpha_grid=[0.5, 0.5]"])
    no_val = load_recipe("tiny-demo", [f"data.path={json.dumps(str(data))}", f"teacher.model={json.dumps(str(teacher))}",
                                       f"cache.dir={json.dumps(str(root / 'cache'))}", "stage2.alpha_grid=[0.0, 0.9]",
                                       'data.val_split="nope"', f"out={json.dumps(str(root / 'run_noval'))}", *FAST])
    with pytest.raises(ConfigError, match="val"):
        distill(no_val, log=lambda m: None)


def test_class_weights_must_match_the_teachers_classes(seg_setup):
    from conftest import one_line_error

    root, data, teacher = seg_setup
    line = one_line_error("distill", "--recipe", "layers-tiny", "--teacher", str(teacher), "--data", str(data),
                          "--out", str(root / "cw"), *FAST, "stage2.loss.class_weights=[1.0, 5.0]")
    assert line == "error: stage2.loss.class_weights has 2 weights but the teacher's head has 9 classes"
    assert not (root / "cw" / "stage1").exists()  # refused before stage 1 spends any time
    line = one_line_error("distill", "--recipe", "layers-tiny", "--teacher", str(teacher), "--data", str(data),
                          "--student", "vit_tiny_c32", "--out", str(root / "vitfpn"), *FAST,
                          'stage2.mode="new_head"', 'stage2.head={type = "fpn"}')
    assert line == "error: an fpn head needs a CNN student with stage maps; StudentEncoder has none"
    assert not (root / "vitfpn" / "stage1").exists()
