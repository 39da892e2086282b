"""distill() end to end on tiny synthetic data: stages, QAT + Q/DQ ONNX in ONNX Runtime, resume, CLI, recipes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_seg_teacher

from mirage_edge.distill.recipe import RECIPES_DIR, load_recipe
from mirage_edge.errors import CheckpointError, ConfigError, DataError

torch.set_num_threads(2)
FAST = ["stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=4", "stage2.batch_size=4", "qat.epochs=1",
        "qat.batch_size=4", "qat.subset_size=4", "data.image_size=64", "run.progress=false", "run.log_every=1",
        "run.eval_batch_size=8"]


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
    """A synthetic layers set (64 px) and a 'fine-tuned' (random) mirage-tiny segmentation teacher."""
    root = tmp_path_factory.mktemp("distill")
    return (root, *tiny_seg_teacher(root))


def _recipe(root: Path, data: Path, teacher: Path, out: str, *extra: str):
    return load_recipe("tiny-demo", [f"data.path={json.dumps(str(data))}", f"teacher.model={json.dumps(str(teacher))}",
                                     f"cache.dir={json.dumps(str(root / 'cache'))}",
                                     f"out={json.dumps(str(root / out))}", *FAST, *extra])


def test_seg_distill_qat_end_to_end_and_resume(seg_setup):
    import onnx

    from mirage_edge.distill import distill, load_student
    from mirage_edge.distill.qat import ort_predict, ort_session
    from mirage_edge.models import create_model

    root, data, teacher = seg_setup
    logs: list[str] = []
    res = distill(_recipe(root, data, teacher, "run", "qat.enabled=true"), log=logs.append)
    rep = res.report
    assert set(rep["stages"]) == {"stage1", "stage2", "qat"}
    assert rep["stages"]["stage1"]["cache"]["computed"] > 0
    test = rep["test"]
    assert test["metric"] == "dice" and 0 <= test["student_value"] <= 1 and 0 <= test["int8_value"] <= 1
    assert "pred_dice_vs_teacher" in test["agreement_fp32"] and -1 <= test["feature_cosine"] <= 1
    # the FP32 student is a normal checkpoint: create_model loads it; its head is the teacher's (drop-in)
    fp32 = create_model("mirage", checkpoint=res.student_dir).eval()
    assert type(fp32.encoder).__name__ == "ProjectedStudent"
    meta = json.loads((res.student_dir / "config.json").read_text())["meta"]
    assert len(meta["teacher"]["weights_sha256"]) == 64 and meta["preprocess"]["size"] == [64, 64]
    # explicit Q/DQ graph, runnable in ONNX Runtime, matching the reloaded fake-quant model
    graph = onnx.load(str(res.onnx_path))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "FakeQuantize" not in ops
    qat = json.loads((res.int8_dir / "qat.json").read_text())["qat"]
    assert qat["weights"].startswith("per-channel symmetric") and "ignored_types" in qat
    q = load_student(res.int8_dir)
    x = torch.rand(2, 1, 64, 64)
    got = next(ort_predict(ort_session(res.onnx_path), [x]))
    with torch.no_grad():
        ref = q(x)
    # within a few output quantization steps (the student's stem BN, with precise-BN statistics
    # as in every trained student, scales a low-variance 1-channel conv by ~50; rounding flips,
    # presumably between ORT's folded Conv+BN and torch's Conv -> BN show up as 1-2 output steps)
    assert float((got - ref).abs().max()) < 3e-2 * float(ref.abs().max())
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) > 0.97
    # QAT trains in eval mode (qat.eval_mode): BN keeps the FP32 student's statistics
    fp_bn = {k: v for k, v in fp32.state_dict().items() if k.endswith("running_var")}
    q_bn = {k: v for k, v in q.state_dict().items() if k.endswith("running_var")}
    assert fp_bn and fp_bn.keys() == q_bn.keys()
    assert all(torch.equal(fp_bn[k], q_bn[k]) for k in fp_bn)
    # finished stages keep final.safetensors (what resume reads), not their optimizer checkpoints
    for stage in ("stage1", "stage2", "qat"):
        assert (res.out_dir / stage / "final.safetensors").is_file()
        assert not (res.out_dir / stage / "checkpoints").exists()
    # an existing output folder needs --resume; resuming reuses the finished stages
    with pytest.raises(ConfigError, match="not empty"):
        distill(_recipe(root, data, teacher, "run", "qat.enabled=true"), log=logs.append)
    logs.clear()
    res2 = distill(_recipe(root, data, teacher, "run", "qat.enabled=true"), resume=True, log=logs.append)
    assert any("stage1: finished earlier" in m for m in logs) and any("qat: finished earlier" in m for m in logs)
    assert res2.report["test"]["student_value"] == pytest.approx(test["student_value"])
    with pytest.raises(CheckpointError, match="recipe differs"):
        distill(_recipe(root, data, teacher, "run", "qat.enabled=true", "stage1.lr=0.1"), resume=True)
    # heldout re-scores the finished run: the same split gives the same report, "all" every image
    from mirage_edge.distill.heldout import heldout_report
    from mirage_edge.distill.heldout import main as heldout_main

    again = heldout_report(res.out_dir, data, "test")
    for k in ("n", "teacher_value", "student_value", "int8_value", "int8_minus_fp32_points"):
        assert again[k] == pytest.approx(test[k]), k
    assert heldout_report(res.out_dir, data, "all")["n"] == 12 > test["n"]
    with pytest.raises(SystemExit, match="not a distill run folder"):
        heldout_main([str(root), "--data", str(data)])
    # a set with another class map is refused, not scored
    other = root / "relabelled"
    shutil.copytree(data, other)
    info = json.loads((other / "INFO.json").read_text())
    info["1"]["label"] = "not RNFL"
    (other / "INFO.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="not the same class map"):
        heldout_report(res.out_dir, other)


def test_new_head_mode_and_intermediate_layers(seg_setup):
    from mirage_edge.distill import distill

    root, data, teacher = seg_setup
    res = distill(_recipe(root, data, teacher, "run_newhead", "stage2.mode=\"new_head\"", "teacher.layers=[0]",
                          "student.layer_map={\"0\" = 3}"), log=lambda m: None)
    train_logs = [json.loads(line) for line in (res.out_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert any("l0" in r for r in train_logs if r["event"] == "train")  # the intermediate-layer term was trained
    from mirage_edge.models import create_model

    m = create_model("mirage", checkpoint=res.student_dir)
    assert type(m.encoder).__name__ == "StudentEncoder"  # fresh head directly on student features
    with pytest.raises(ConfigError, match="layer_map"):
        distill(_recipe(root, data, teacher, "run_bad", "student.layer_map={\"0\" = 3}"), log=lambda m: None)


def test_cli_with_official_fixture_teacher(mirage_ref, seg_setup):
    """`mirage-edge distill --teacher PATH` with the official-format .pth (tiny, patch 8 at 64 px)."""
    from click.testing import CliRunner

    from mirage_edge.cli import cli

    root, data, _ = seg_setup
    out = root / "fx"
    args = ["distill", "--teacher", str(mirage_ref / "tiny_official.pth"), "--teacher-config",
            str(mirage_ref / "tiny_config.json"), "--student", "student-tiny", "--data", str(data), "--task", "none",
            "--image-size", "64", "--out", str(out), "--recipe", "tiny-demo", "--no-qat",
            f"cache.dir={json.dumps(str(root / 'cache'))}", *FAST]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "feature cosine" in r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["teacher"]["grid"] == [8, 8]  # student stride-32 2x2 map resampled to the teacher's 8x8 grid
    assert (out / "student" / "model.safetensors").is_file()
    bad_out = root / "bad"
    bad = CliRunner().invoke(cli, ["distill", "--recipe", "tiny-demo", "--teacher", "no/such/teacher",
                                   "--data", str(data), "--out", str(bad_out)])
    assert bad.exit_code != 0 and "neither a registered model nor an existing path" in bad.output
    assert not bad_out.exists()  # nothing is written before the teacher and data resolve


def test_curated_recipes_load_strictly():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    assert {"tiny-demo", "mirage-large-mnv4-layers"} <= set(names)
    for n in names:
        r = load_recipe(n)
        assert r.name == n
    with pytest.raises(ConfigError, match="stage1.epoch"):
        load_recipe("tiny-demo", ["stage1.epoch=3"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_recipe("tiny-demo", ["data.image_size=100"])
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no-such-recipe")


def test_cross_modal_distillation_and_its_benchmark(tmp_path):
    """Teacher fed B-scan + SLO vs the B-scan only: different targets (and cache entries); both
    students see only the B-scan; the benchmark compares them on B-scans with a layer probe."""
    from mirage_edge.data.synth import synthesize
    from mirage_edge.distill import distill
    from mirage_edge.distill.crossmodal_bench import measure
    from mirage_edge.models import create_model, save_model

    data = synthesize(tmp_path / "mm", "multimodal", 12, seed=0, size=64)
    torch.manual_seed(0)
    save_model(create_model("mirage-tiny", input_size=64, depth=1, in_domains=["bscan", "slo"], out_domains=[]),
               tmp_path / "teacher")
    runs = {}
    for name, mods in (("a", '["bscan", "slo"]'), ("b", '["bscan"]')):
        r = load_recipe("crossmodal-tiny", [f"data.path={json.dumps(str(data))}",
                                            f"teacher.model={json.dumps(str(tmp_path / 'teacher'))}",
                                            f"teacher.modalities={mods}", 'student.name="student-tiny"',
                                            f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
                                            f"out={json.dumps(str(tmp_path / name))}", *FAST])
        runs[name] = distill(r, log=lambda m: None)
    caches = {n: r.report["stages"]["stage1"]["cache"]["dir"] for n, r in runs.items()}
    assert caches["a"] != caches["b"]
    rec = measure(str(tmp_path / "teacher"), str(data), str(runs["a"].student_dir), str(runs["b"].student_dir),
                  64, 1)
    assert rec["slo_effect_rel_norm"] > 0.0  # the SLO changes the teacher's B-scan tokens
    assert set(rec["models"]) == {"teacher_bscan_slo", "teacher_bscan", "student_A", "student_B"}
    for m in rec["models"].values():
        assert 0.0 <= m["probe_token_accuracy"] <= 1.0
    a = rec["models"]["student_A"]
    assert -1.0 <= a["slo_part_alignment"] <= 1.0 and -1.0 <= a["cos_to_teacher_bscan_slo"] <= 1.0


def _noise_folder(folder: Path, n: int, seed: int) -> Path:
    """A plain folder of n random 80 x 96 greyscale PNGs (an unlabelled image folder)."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (80, 96), dtype=np.uint8)).save(folder / f"scan_{i}.png")
    return folder


def _distill_with_folder(seg_setup, tmp_path: Path, stage: str, n: int, seed: int) -> tuple[dict, list[str]]:
    """Run the tiny recipe with `<stage>.data` = a folder of n noise images; (report stages, log lines)."""
    from mirage_edge.distill import distill

    root, data, teacher = seg_setup
    extra = _noise_folder(tmp_path / f"unlabelled_{stage}", n, seed)
    logs: list[str] = []
    res = distill(_recipe(root, data, teacher, f"run_{stage}data", f"{stage}.data={json.dumps(str(extra))}",
                          f"cache.dir={json.dumps(str(tmp_path / 'cache'))}"), log=logs.append)
    return res.report["stages"], logs


def test_stage1_on_a_separate_unlabelled_folder(seg_setup, tmp_path):
    """stage1.data: feature KD on another folder's images (any image folder), stage 2 on data.path."""
    from mirage_edge.distill import distill
    from mirage_edge.errors import DataError

    st, logs = _distill_with_folder(seg_setup, tmp_path, "stage1", 5, seed=0)
    assert st["stage1"]["cache"]["computed"] == 5  # the 5 unlabelled images, not data.path's train split
    assert st["stage2"]["cache"]["computed"] > 5
    assert any("stage 1 on" in m and "(5 images)" in m for m in logs)
    root, data, teacher = seg_setup
    with pytest.raises(DataError, match="nowhere"):
        distill(_recipe(root, data, teacher, "run_s1bad", f"stage1.data={json.dumps(str(tmp_path / 'nowhere'))}"),
                log=lambda m: None)


def test_stage2_adds_unlabelled_images_as_kd_only(seg_setup, tmp_path):
    """stage2.data: unlabelled images join stage 2 with the teacher's logits as their only target."""
    import math

    st, logs = _distill_with_folder(seg_setup, tmp_path, "stage2", 4, seed=1)
    n_train = st["stage1"]["cache"]["computed"]  # stage 1 stays on data.path's train split
    assert st["stage2"]["cache"]["computed"] == n_train + 4
    assert any("stage 2 adds 4 unlabelled images" in m for m in logs)
    assert math.isfinite(st["stage2"]["last_loss"])


def test_unlabelled_samples_in_a_labelled_set_are_ignored_by_ce_and_dice(seg_setup, tmp_path):
    import torch

    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.distill.data import DistillSamples, open_index
    from mirage_edge.distill.losses import TaskLossConfig, generalized_dice_loss, kd_kl, task_kd_loss
    from mirage_edge.errors import DataError

    _, data, _ = seg_setup
    extra = _noise_folder(tmp_path / "unl", 1, seed=2)
    spec = PreprocessSpec(size=(64, 64))
    labelled = DistillSamples(open_index(data, "auto"), "train", spec)
    n = len(labelled)
    ds = labelled.with_unlabelled(DistillSamples(open_index(extra, "none"), None, spec, labels=False))
    assert len(ds) == n + 1 and len(labelled) == n  # a new set: stage 1 may still be reading the labelled one
    # ids carry their folder: the same split/id in two folders never shares a cache entry
    assert ds.sample_id(n).split(":")[0] != ds.sample_id(0).split(":")[0]
    assert ds.sample_id(0).split(":")[1] == f"{ds.samples[0].split}/{ds.samples[0].id}"
    assert int(ds[n]["label"].max()) == -1 and ds[n]["label"].shape == ds[0]["label"].shape
    with pytest.raises(DataError, match="once"):
        ds.with_unlabelled(DistillSamples(open_index(extra, "none"), None, spec, labels=False))

    cfg = TaskLossConfig(alpha=0.5, temperature=2.0, dice=1.0)
    s, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    lab = torch.randint(0, 4, (3, 8, 8))
    lab[2] = -1  # the third image is unlabelled
    total, parts = task_kd_loss(s, t, lab, "seg", cfg)
    kd = kd_kl(s, t, 2.0, dim=1)
    ce = torch.nn.functional.cross_entropy(s[:2], lab[:2])
    gd = generalized_dice_loss(s[:2], lab[:2])
    torch.testing.assert_close(total, 0.5 * kd + 0.5 * ce + gd)
    only_kd, parts = task_kd_loss(s, t, torch.full((3, 8, 8), -1), "seg", cfg)
    torch.testing.assert_close(only_kd, kd)
    assert set(parts) == {"kd"}


def test_conv_stem_vit_student_distills_to_a_qdq_onnx(seg_setup):
    """The supported ViT (conv stem + transformer) under NNCF's transformer rules: its stem convs are
    quantized too, and the Q/DQ graph runs in ONNX Runtime like the fake-quant model."""
    import onnx

    from mirage_edge.distill import distill, load_student
    from mirage_edge.distill.qat import ort_predict, ort_session

    root, data, teacher = seg_setup
    res = distill(_recipe(root, data, teacher, "vit", "qat.enabled=true", 'student.name="vit_tiny_c32"',
                          'qat.model_type="transformer"'), log=lambda m: None)
    graph = onnx.load(str(res.onnx_path))
    produced_by = {o: n for n in graph.graph.node for o in n.output}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    stem = [n for n in convs if "patch_embed" in n.name or any("patch_embed" in i for i in n.input)]
    assert len(stem) >= 6, [n.name for n in convs]
    # every stem conv reads a dequantized activation (INT8 kernels, not a float island)
    assert all(produced_by[n.input[0]].op_type == "DequantizeLinear" for n in stem)
    x = torch.rand(2, 1, 64, 64)
    got = next(ort_predict(ort_session(res.onnx_path), [x]))
    with torch.no_grad():
        ref = load_student(res.int8_dir)(x)
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) > 0.97
