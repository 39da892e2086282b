"""`mirage-edge cv`: subject-wise folds, the fold folders of links, an end-to-end tiny CV whose table
equals the per-fold reports, resume, and one-line errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error

SUBJECTS = 6
SCANS = 2
TEACHER_TOML = """
task = "seg"
image_size = 64
mode = "full"
[model]
name = "mirage-tiny"
overrides = { input_size = 64, dim_tokens = 32, depth = 1, num_heads = 2, patch_size = { bscan = [8, 8], slo = [8, 8], bscanlayermap = [2, 2] } }
[head]
preds_per_patch = 16
class_dim = 16
depth = 1
[loop]
epochs = 1
batch_size = 4
threads = 2
progress = false
log_every = 1
[optim]
lr = 1e-3
warmup_steps = 1
"""
DISTILL_SETS = ["stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=4", "stage2.batch_size=4", "qat.enabled=false",
                "data.image_size=64", "run.progress=false", "run.log_every=1", "run.eval_batch_size=8", "run.threads=2",
                "baseline.epochs=1"]


def make_seg_set(root: Path, subjects: int = SUBJECTS, scans: int = SCANS) -> Path:
    """A Duke-like set at 64 x 64: subjectSS_annotKK.png B-scans with a bright blob labelled 'Fluid',
    subjects 1..n-2 in train, n-1 in val, n in test."""
    from mirage_edge.data.io import write_png

    rng = np.random.default_rng(0)
    (root / "INFO.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "INFO.json").write_text(json.dumps({"0": {"value": 0, "label": "Background"},
                                                "1": {"value": 1, "label": "Fluid"}}))
    for s in range(1, subjects + 1):
        split = "test" if s == subjects else "val" if s == subjects - 1 else "train"
        for k in range(scans):
            img = (rng.random((64, 64)) * 80).astype(np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            y, x = rng.integers(8, 48, 2)
            mask[y:y + 12, x:x + 12] = 1
            img[mask == 1] += 150
            write_png(root / split / "bscan" / f"subject{s:02d}_annot{k:02d}.png", img)
            write_png(root / split / "semseg" / f"subject{s:02d}_annot{k:02d}.png", mask)
    return root


@pytest.fixture(scope="module")
def seg_set(tmp_path_factory) -> Path:
    return make_seg_set(tmp_path_factory.mktemp("cvdata") / "seg")


@pytest.fixture(scope="module")
def teacher_toml(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cvconf") / "teacher.toml"
    p.write_text(TEACHER_TOML)
    return p


def test_natural_order_and_folds_test_every_subject_once():
    from mirage_edge.bench.cv.folds import make_folds, natural_key

    subjects = sorted([f"s{i}" for i in range(1, 11)], key=natural_key)
    assert subjects[:3] == ["s1", "s2", "s3"] and subjects[-1] == "s10"
    folds = make_folds(subjects, 5)
    assert [f.test for f in folds] == [tuple(subjects[2 * k:2 * k + 2]) for k in range(5)]
    tested = [s for f in folds for s in f.test]
    assert sorted(tested, key=natural_key) == subjects  # every subject tested exactly once
    for f in folds:
        parts = [set(f.train), set(f.val), set(f.test)]
        assert set().union(*parts) == set(subjects) and sum(map(len, parts)) == len(subjects)  # disjoint
        assert f.val == folds[(f.index - 1) % 5].test
    # the last fold of Duke's 10 subjects is its official split: 1-6 train, 7-8 val, 9-10 test
    assert folds[4].train == tuple(subjects[:6]) and folds[4].val == ("s7", "s8")
    uneven = make_folds([f"s{i}" for i in range(7)], 3)  # 7 subjects: groups of 3, 2, 2
    assert [len(f.test) for f in uneven] == [3, 2, 2]


def test_fold_folder_links_every_file_of_its_subjects(seg_set, tmp_path):
    from mirage_edge.bench.cv.folds import build_fold_data, plan_folds
    from mirage_edge.data.layout import scan_dataset

    folds, subjects = plan_folds(seg_set, 3)
    assert list(subjects) == [f"subject{s:02d}" for s in range(1, SUBJECTS + 1)]
    built = build_fold_data(folds[1], subjects, seg_set / "INFO.json", tmp_path / "d")
    assert built["links"] == "symlink" and built["images"] == {"train": 2 * SCANS, "val": 2 * SCANS, "test": 2 * SCANS}
    index = scan_dataset(tmp_path / "d", "segmentation")
    for split in ("train", "val", "test"):
        assert {s.volume for s in index.samples(split)} == set(getattr(folds[1], split))
        for s in index.samples(split):
            assert s.image.is_symlink() and s.mask.is_symlink()
            assert s.image.resolve().parents[2] == seg_set.resolve()
    assert (tmp_path / "d" / "INFO.json").resolve() == (seg_set / "INFO.json").resolve()
    # rebuilding replaces the folder, never the originals
    build_fold_data(folds[2], subjects, seg_set / "INFO.json", tmp_path / "d")
    assert {s.volume for s in scan_dataset(tmp_path / "d", "segmentation").samples("test")} == set(folds[2].test)
    assert len(list((seg_set / "train" / "bscan").iterdir())) == (SUBJECTS - 2) * SCANS


def test_links_fall_back_to_copies(seg_set, tmp_path, monkeypatch):
    from mirage_edge.bench.cv import folds as F

    def refuse(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(F.os, "symlink", refuse)
    fs, subjects = F.plan_folds(seg_set, 3)
    built = F.build_fold_data(fs[0], subjects, seg_set / "INFO.json", tmp_path / "d")
    assert built["links"] == "copy"
    f = next((tmp_path / "d" / "test" / "bscan").iterdir())
    assert not f.is_symlink() and f.read_bytes() == next((seg_set / "train" / "bscan").iterdir()).read_bytes()


def _cv_args(seg_set: Path, teacher_toml: Path, out: Path, *extra: str) -> list[str]:
    args = ["cv", "--data", str(seg_set), "--folds", "3", "--teacher-config", str(teacher_toml),
            "--recipe", "tiny-demo", "--student", "student-tiny", "--out", str(out)]
    for s in DISTILL_SETS:
        args += ["--distill-set", s]
    return [*args, *extra]


def test_cv_end_to_end_resume_and_report_equal_the_fold_reports(seg_set, teacher_toml, tmp_path, monkeypatch):
    """Two of three folds run (the third is left out to keep the test short); the table holds the
    reports' numbers; a rerun skips the finished folds; the report says it is incomplete."""
    from click.testing import CliRunner

    from mirage_edge.cli import cli
    from mirage_edge.bench.cv import report as R
    from mirage_edge.bench.cv import run as cvrun

    out, results = tmp_path / "cv", tmp_path / "results"
    args = _cv_args(seg_set, teacher_toml, out, "--fold", "0", "--fold", "1", "--report-dir", str(results),
                    "--teacher-set", "loop.epochs=1", "--note", "tiny test run")
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "fold 0 [1/3]: test subject01, subject02" in res.output and "fold 1 [2/3] done" in res.output
    rec = json.loads((out / "cv.json").read_text())
    assert rec["schema"] == "mirage-edge/cv" and rec["schema_version"] == 1
    assert rec["folds_done"] == [0, 1] and not rec["complete"] and rec["metric"] == "dice"
    assert json.loads((results / "cv.json").read_text())["folds_done"] == [0, 1]
    assert not list(results.glob("fold*"))  # only the table and the json, no checkpoints
    md = (out / "README.md").read_text()
    assert "Incomplete" in md and "tiny test run" in md and "--teacher-set loop.epochs=1" in md
    assert rec["hardware"]["cpu_count"] >= 1 and rec["commit"] and f"- Commit: `{rec['commit']}`" in md
    assert rec["fold_commits"] == {"0": rec["commit"], "1": rec["commit"]}
    later = R.markdown({**rec, "commit": "abc"}, "")  # the report rewritten on other code than the folds ran on
    assert f"the folds ran on `{rec['commit']}`; this report was written on `abc`" in later
    for r in rec["folds"]:
        k = r["fold"]
        report = json.loads((out / f"fold{k}" / "distill" / "report.json").read_text())["test"]
        fold = json.loads((out / f"fold{k}" / "fold.json").read_text())
        assert r["test"] == fold["test"] == [f"subject{2 * k + 1:02d}", f"subject{2 * k + 2:02d}"]
        assert set(r["val"]).isdisjoint(r["test"]) and set(r["train"]).isdisjoint(r["val"] + r["test"])
        assert r["teacher"] == report["teacher_value"] and r["student"] == report["student_value"]
        assert r["twin"] == report["baseline_value"] and r["kd_gain_points"] == report["kd_gain_points"]
        assert r["per_subject"]["student"] == report["student_fp32"]["per_volume_dice"]
        assert set(r["per_subject"]["teacher"]) == set(r["test"])
        teacher = json.loads((out / f"fold{k}" / "teacher" / "test_metrics.json").read_text())
        assert r["teacher_own_eval"] == teacher["test"]["dice"]
        assert r["seconds"]["total"] == pytest.approx(r["seconds"]["teacher"] + r["seconds"]["distill"])
        assert r["teacher_best_val"] == teacher["val"]["dice"]
        assert f"| {k} | {', '.join(r['test'])} | {', '.join(r['val'])} | {r['images']['train']} | " \
               f"{r['teacher_best_val']:.4f} | {r['teacher']:.4f} | {r['student']:.4f} | {r['twin']:.4f} | " \
               f"{r['kd_gain_points']:+.2f}" in md
    s = rec["summary"]["student"]
    vals = [r["student"] for r in rec["folds"]]
    assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(vals)) and s["std"] == pytest.approx(np.std(vals, ddof=1))
    assert f"{s['mean']:.4f} ± {s['std']:.4f}" in md
    assert set(rec["per_subject"]) == {f"subject{i:02d}" for i in range(1, 5)}

    # resume: finished folds are skipped (no training at all), the missing one runs
    ran: list[int] = []
    real = cvrun.run_fold
    monkeypatch.setattr(cvrun, "run_fold",
                        lambda spec, fold, *a, **k: ran.append(fold.index) or real(spec, fold, *a, **k))
    monkeypatch.setattr(cvrun, "_teacher", lambda *a, **k: pytest.fail("a finished fold trained again"))
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert ran == [] and res.output.count("skipped") == 2
    assert json.loads((out / "cv.json").read_text())["folds"] == rec["folds"]

    # other settings in the same --out: refused, naming what differs
    err = one_line_error(*_cv_args(seg_set, teacher_toml, out, "--fold", "2", "--teacher-set", "loop.epochs=2"))
    assert "holds a cross-validation with other folds or settings" in err and "teacher.loop.epochs" in err


def test_fold_interrupted_after_its_teacher_reuses_it(seg_set, teacher_toml, tmp_path, monkeypatch):
    from mirage_edge.bench.cv import run as cvrun
    from mirage_edge.bench.cv.run import CVSpec, run_cv

    spec = CVSpec(data=str(seg_set), out=str(tmp_path / "cv"), teacher_config=str(teacher_toml), folds=3, only=(2,),
                  recipe="tiny-demo", student="student-tiny", distill_sets=tuple(DISTILL_SETS))
    monkeypatch.setattr(cvrun, "_distill", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_cv(spec, log=lambda m: None)
    fold = tmp_path / "cv" / "fold2"
    assert (fold / "teacher.json").is_file() and not (fold / "result.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr("mirage_edge.train.finetune.run_finetune", lambda *a, **k: pytest.fail("teacher retrained"))
    real = cvrun.run_fold

    def and_another_process_finishes_fold0(spec, f, *a, **k):
        # `mirage-edge cv --fold 0` on the same --out, finishing while this process runs fold 2
        r = real(spec, f, *a, **k)
        other = {**r, "fold": 0, "test": ["subject01", "subject02"],
                 "per_subject": {m: {f"subject0{i}": v for i, v in zip((1, 2), d.values())}
                                 for m, d in r["per_subject"].items()}}
        (fold.parent / "fold0").mkdir()
        (fold.parent / "fold0" / "result.json").write_text(json.dumps(other))
        return r

    monkeypatch.setattr(cvrun, "run_fold", and_another_process_finishes_fold0)
    rec = run_cv(spec, log=lambda m: None)
    assert rec["folds_done"] == [0, 2] and (fold / "result.json").is_file()  # the table has both
    assert json.loads((fold.parent / "cv.json").read_text())["folds_done"] == [0, 2]
    assert rec["folds"][1]["seconds"]["teacher"] == json.loads((fold / "teacher.json").read_text())["seconds"]


PRETRAIN_TOML = """
[model]
name = "mirage-tiny"
overrides = { input_size = 64, dim_tokens = 32, depth = 1, num_heads = 2, patch_size = { bscan = [8, 8], slo = [8, 8], bscanlayermap = [2, 2] } }
[data]
modalities = ["bscan"]
[masking]
num_encoded_tokens = 16
[loop]
epochs = 2
batch_size = 2
threads = 2
progress = false
log_every = 1
"""


def test_pretrain_stage_reads_the_folds_train_and_val_and_starts_the_teacher(seg_set, teacher_toml, tmp_path,
                                                                              monkeypatch):
    """--pretrain-config: each fold pretrains on its own train B-scans (val for the loss, test never
    opened), the teacher is fine-tuned from that fold's pretrain/best, the stage's seconds count in the
    fold's total, and a rerun reuses it."""
    from click.testing import CliRunner

    import mirage_edge.data as D
    import mirage_edge.train.finetune as FT
    from mirage_edge.bench.cv import run as cvrun
    from mirage_edge.cli import cli
    from mirage_edge.bench.cv.run import CVSpec, run_cv

    conf = tmp_path / "pretrain.toml"
    conf.write_text(PRETRAIN_TOML)
    splits, starts = [], []
    real_folder, real_finetune = D.MultimodalFolder, FT.run_finetune

    def folder(root, split=None, **kw):
        splits.append(split)
        return real_folder(root, split=split, **kw)

    def finetune(cfg, **kw):
        starts.append(cfg.model.checkpoint)
        return real_finetune(cfg, **kw)

    monkeypatch.setattr(D, "MultimodalFolder", folder)
    monkeypatch.setattr(FT, "run_finetune", finetune)
    spec = CVSpec(data=str(seg_set), out=str(tmp_path / "cv"), teacher_config=str(teacher_toml), folds=3, only=(2,),
                  recipe="tiny-demo", student="student-tiny", distill_sets=tuple(DISTILL_SETS),
                  pretrain_config=str(conf), pretrain_sets=("loop.seed=1",))
    rec = run_cv(spec, log=lambda m: None)
    fold = tmp_path / "cv" / "fold2"
    info = json.loads((fold / "pretrain.json").read_text())
    assert sorted(splits) == ["train", "val"]
    assert starts == [str(fold / "pretrain" / "best")] and Path(info["best"]) == fold / "pretrain" / "best"
    r = rec["folds"][0]
    assert r["seconds"]["pretrain"] == info["seconds"]
    assert r["seconds"]["total"] == pytest.approx(info["seconds"] + r["seconds"]["teacher"] + r["seconds"]["distill"])
    plan = json.loads((tmp_path / "cv" / "plan.json").read_text())["settings"]
    assert plan["pretrain"]["masking"]["num_encoded_tokens"] == 16 and plan["pretrain_sets"] == ["loop.seed=1"]
    assert "checkpoint" not in plan["teacher"]["model"]  # each fold's own path, not a setting
    # a fold interrupted after pretraining reuses it
    (fold / "result.json").unlink()
    (fold / "teacher.json").unlink()
    monkeypatch.setattr(cvrun, "_distill", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr("mirage_edge.train.pretrain.run_pretrain", lambda *a, **k: pytest.fail("pretrained again"))
    with pytest.raises(KeyboardInterrupt):
        run_cv(spec, log=lambda m: None)
    assert starts[-1] == str(fold / "pretrain" / "best")
    # a teacher config that names one checkpoint for every fold, without per-fold pretraining: said
    res = CliRunner().invoke(cli, _cv_args(seg_set, teacher_toml, tmp_path / "o", "--dry-run", "--teacher-set",
                                           f'model.checkpoint="{fold / "pretrain" / "best"}"'))
    assert res.exit_code == 0 and "every fold's teacher starts from the same checkpoint" in res.output
    err = one_line_error(*_cv_args(seg_set, teacher_toml, tmp_path / "o", "--pretrain-config", str(tmp_path / "x.toml")))
    assert "--pretrain-config" in err and "no such file" in err


def test_dry_run_prints_the_folds_and_writes_nothing(seg_set, teacher_toml, tmp_path):
    from click.testing import CliRunner

    from mirage_edge.cli import cli

    res = CliRunner().invoke(cli, _cv_args(seg_set, teacher_toml, tmp_path / "cv", "--dry-run"))
    assert res.exit_code == 0, res.output
    assert "6 subjects, 12 B-scans, 3 folds" in res.output
    assert "fold 0: test subject01, subject02 | val subject05, subject06 | train subject03, subject04" in res.output
    assert not (tmp_path / "cv").exists()


def test_bad_inputs_fail_in_one_line(seg_set, teacher_toml, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a segmentation set: no INFO.json" in one_line_error(*_cv_args(empty, teacher_toml, tmp_path / "o"))
    assert "no such folder" in one_line_error(*_cv_args(tmp_path / "nope", teacher_toml, tmp_path / "o"))
    few = make_seg_set(tmp_path / "few", subjects=5, scans=1)
    err = one_line_error(*_cv_args(few, teacher_toml, tmp_path / "o"))
    assert "has 5 subject(s)" in err and "need at least 6" in err
    err = one_line_error(*_cv_args(seg_set, tmp_path / "missing.toml", tmp_path / "o"))
    assert "--teacher-config" in err and "no such file" in err
    err = one_line_error(*_cv_args(seg_set, teacher_toml, tmp_path / "o", "--folds", "2"))
    assert "at least 3 folds" in err
    err = one_line_error(*_cv_args(seg_set, teacher_toml, tmp_path / "o", "--fold", "3"))
    assert "folds are numbered 0..2" in err
    err = one_line_error(*_cv_args(seg_set, teacher_toml, tmp_path / "o", "--distill-set", "stage9.epochs=1"))
    assert "stage9" in err
    cls_toml = tmp_path / "cls.toml"
    cls_toml.write_text('task = "cls"\n')
    assert "segmentation sets" in one_line_error(*_cv_args(seg_set, cls_toml, tmp_path / "o"))
    images = tmp_path / "images" / "train" / "bscan"
    images.mkdir(parents=True)
    (tmp_path / "images" / "INFO.json").write_text(json.dumps({"0": {"value": 0, "label": "Background"}}))
    assert "empty split" in one_line_error(*_cv_args(tmp_path / "images", teacher_toml, tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # every refusal came before any work
