"""`distill(recipe)`: teacher -> student in up to three stages, each run by the generic trainer.

Stage 1 (task-agnostic): the projected student matches the teacher's B-scan token map (+ chosen
intermediate blocks) on images of the training split (labels unused), targets from the teacher
cache. Stage 2 (task-aware, fine-tuned teacher only): logit KD (+ CE, + generalized Dice for
segmentation) with the teacher's head reused on the projected tokens ("drop_in") or a fresh head.
QAT: NNCF fake-quant INT8, trained with the FP32 student as KD teacher, exported to Q/DQ ONNX and
evaluated in ONNX Runtime.

Output folder (`recipe.out`)::

    recipe.toml              the resolved recipe
    stage1/ stage2/ qat/     trainer run dirs (metrics.jsonl, best/, final.safetensors + DONE.json;
                             checkpoints/ while the stage runs)
    student/                 FP32 student checkpoint (mirage_edge.distill.student_io)
    student_int8/            QAT checkpoint + model.onnx (explicit Q/DQ)
    report.json              test metrics: teacher, FP32 student, INT8 (ORT); agreement; timings

Resume (`resume=True`): finished stages (DONE marker) are skipped and their weights reloaded; an
unfinished stage continues from its latest checkpoint (the trainer's exact resume).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mirage_edge import config as cfgmod
from mirage_edge._io import atomic_write_text, check_output_dir
from mirage_edge._log import progress
from mirage_edge.distill import evaluate as ev
from mirage_edge.distill.cache import CacheKey, TeacherCache
from mirage_edge.distill.data import DistillSamples, collate, open_index
from mirage_edge.distill.losses import feature_loss, label_loss, task_kd_loss
from mirage_edge.distill.recipe import DistillRecipe, Stage2Spec
from mirage_edge.distill.stage import Log, TrainForward, run_stage
from mirage_edge.distill.student_io import save_student
from mirage_edge.distill.teacher import Teacher, build_teacher
from mirage_edge.errors import CheckpointError, ConfigError, DataError
from mirage_edge.models.projector import ProjectedStudent
from mirage_edge.train.checkpoint import unwrap


@dataclass
class DistillResult:
    out_dir: Path
    student_dir: Path
    int8_dir: Path | None
    onnx_path: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def cache_root(spec_dir: str) -> Path:
    if spec_dir:
        return Path(spec_dir)
    home = Path(os.environ.get("MIRAGE_EDGE_HOME", Path.home() / ".cache" / "mirage-edge"))
    return home / "cache" / "teacher"


# ------------------------------------------------------------------------------------- cache fill
def cache_cost(key: CacheKey, n_rows: int) -> int:
    """Bytes `n_rows` (sample, view) rows of teacher outputs `key.outputs` take in the cache."""
    return key.row_bytes() * n_rows  # values + int8 scales


def check_cache_room(cache: TeacherCache, todo: int, total: int, max_gb: float, log: Log) -> None:
    """Say what the cache costs and refuse before filling when the rows still to compute would not fit
    on the disk (with a 5 % margin) or exceed `cache.max_gb`."""
    import math

    def on_disk(rows: int) -> int:  # shards are allocated whole: `shard_size` rows each
        return cache_cost(cache.key, math.ceil(rows / cache.shard_size) * cache.shard_size)

    need, full = on_disk(todo), on_disk(total)
    free = shutil.disk_usage(_existing_parent(cache.dir)).free
    gb = 1e9
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in sorted(cache.key.outputs.items()))
    log(f"teacher cache: {total} rows ({shapes}, {cache.key.dtype}) = {cache_cost(cache.key, total) / gb:.4g} GB "
        f"of values, {full / gb:.4g} GB on disk in whole shards of {cache.shard_size} rows; {todo} to compute = "
        f"at most {need / gb:.4g} GB more; {free / gb:.1f} GB free at {cache.dir.parent}")
    if max_gb and need > max_gb * gb:
        raise ConfigError(f"the teacher cache for this data would need {need / gb:.2f} GB more at {cache.dir}, above "
                          f"cache.max_gb = {max_gb:g}; raise it, point cache.dir at a larger disk, or run the teacher "
                          "online (cache.enabled = false)")
    if need > 0.95 * free:
        raise ConfigError(f"the teacher cache for this data needs {need / gb:.2f} GB more at {cache.dir} but only "
                          f"{free / gb:.2f} GB are free there; point cache.dir at a larger disk or run the teacher "
                          "online (cache.enabled = false)")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def fill_cache(cache: TeacherCache, ds: DistillSamples, teacher: Teacher, with_logits: bool,
               batch_size: int, log: Log, max_gb: float = 0.0) -> dict[str, Any]:
    """Compute the teacher targets missing from `cache` for every (sample, view) of `ds`.

    Under torchrun every rank calls it: rank 0 (which opened `cache` under its lock) lists the missing
    rows and checks the room for them, each rank computes every world_size-th row, and rank 0 alone
    writes and commits them all (one writer: no two processes touch a file; readers see committed
    rows only). Rows are keyed by sample, never by rank, so a cache filled by N processes serves M."""
    import math

    from mirage_edge.train import distributed as D

    main = not D.is_dist() or D.env_dist_info().is_main
    rank, world = (D.env_dist_info().rank, D.env_dist_info().world_size) if D.is_dist() else (0, 1)

    def missing() -> list[tuple[str, int]]:
        todo = cache.missing([(ds.sample_id(i), ds.fingerprint(i)) for i in range(len(ds))])
        check_cache_room(cache, len(todo), len(ds) * cache.key.views, max_gb, log)
        return todo

    todo = D.on_main(missing)
    pos = {ds.sample_id(i): i for i in range(len(ds))}
    mine = todo[rank::world]
    t0 = time.perf_counter()
    for r in range(math.ceil(math.ceil(len(todo) / world) / batch_size)):
        chunk = mine[r * batch_size:(r + 1) * batch_size]
        rows: list[tuple[str, int, dict[str, Any]]] = []
        if chunk:
            out = teacher.targets(collate([ds.load(pos[sid], v) for sid, v in chunk]), with_logits=with_logits)
            bad = [sid for j, (sid, _) in enumerate(chunk) if not all(bool(torch.isfinite(out[k][j]).all())
                                                                     for k in cache.key.outputs)]
            if bad:  # caught here, not later as a NaN loss that blames the learning rate
                raise DataError(f"the teacher's outputs for {', '.join(bad[:5])} are not finite (NaN or inf): the "
                                "teacher checkpoint or these input images are broken; nothing was cached for them")
            rows = [(sid, v, {k: out[k][j].cpu().numpy() for k in cache.key.outputs}) for j, (sid, v) in enumerate(chunk)]
        for part in D.all_gather_objects(rows):  # every rank's rows of this round; [rows] in one process
            if main:
                for sid, v, arrays in part:
                    cache.write(sid, v, arrays)
        if main and r % 20 == 19:
            cache.commit()
    if main:
        cache.commit()
    dt = time.perf_counter() - t0
    if todo:
        log(f"teacher cache {cache.dir}: computed {len(todo)} entries in {dt:.1f} s"
            + (f" on {world} processes" if world > 1 else "") + f" ({cache.status})")
    else:
        log(f"teacher cache {cache.dir}: all {len(ds) * cache.key.views} entries reused ({cache.status})")
    return {"dir": str(cache.dir), "status": cache.status, "computed": len(todo), "seconds": dt, "processes": world}


def attach_cache(ds: DistillSamples, teacher: Teacher, recipe: DistillRecipe, with_logits: bool,
                 log: Log) -> dict[str, Any]:
    shapes = teacher.output_shapes(with_logits)
    if with_logits:  # stage 2 only needs the logits (and tokens for the optional feature term)
        shapes = {k: v for k, v in shapes.items() if k == "logits" or (k == "tokens" and recipe.stage2.loss.feature)}
    key = CacheKey(teacher_hash=teacher.weights_hash(), outputs=shapes, modalities=teacher.modalities,
                   preprocess=cfgmod.to_dict(ds.spec), augment=cfgmod.to_dict(ds.augment) if ds.augment else {},
                   aug_seed=ds.aug_seed, views=ds.views, dtype=recipe.cache.dtype)
    from mirage_edge.train import distributed as D

    cache = TeacherCache(cache_root(recipe.cache.dir), key, recipe.cache.shard_size)
    main = D.env_dist_info().is_main
    # rank 0 holds the lock (another run may be filling the same cache) while every rank computes
    with cache.locked(log) if main else contextlib.nullcontext():
        if main:
            cache.open()
        stats = fill_cache(cache, ds, teacher, with_logits, recipe.run.eval_batch_size, log, recipe.cache.max_gb)
    D.barrier()
    if not main:  # read what rank 0 committed
        with cache.locked():
            cache.open()
    ds.cache = cache
    return stats


def _online_targets(teacher: Teacher, batch: dict[str, Any], with_logits: bool) -> dict[str, torch.Tensor]:
    if any(k.startswith("t_") for k in batch):
        return {k[2:]: v for k, v in batch.items() if k.startswith("t_")}
    return teacher.targets(batch, with_logits=with_logits)


# ------------------------------------------------------------------------------------- the pipeline
def _prepare_out(recipe: DistillRecipe, resume: bool, overwrite: bool) -> Path:
    out = check_output_dir(recipe.out, "--out")  # a file, read-only or full: one line naming it, before any work
    saved = out / "recipe.toml"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise ConfigError(f"output folder {out} is not empty; pass --resume to continue it or --overwrite")
        elif saved.is_file():
            old = cfgmod.read_file(saved)
            new = json.loads(json.dumps(recipe.to_dict()))
            # the twin (baseline) does not touch the distilled student: adding one to a finished run is a resume;
            # per_student's effect is already in the sections it sets
            diff = sorted(k for k in set(old) | set(new)
                          if k not in ("run", "baseline", "per_student", "applied_per_student")
                          and old.get(k) != new.get(k))
            if diff:
                raise CheckpointError(f"cannot resume {out}: recipe differs from the saved one in {diff}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, cfgmod.dumps_toml(recipe.to_dict()))
    return out


def _datasets(recipe: DistillRecipe, teacher: Teacher) -> tuple[DistillSamples, DistillSamples | None,
                                                                DistillSamples | None, DistillSamples,
                                                                DistillSamples]:
    """train (+ stage2.data's images), val, test of data.path, the stage-1 set (train, or
    stage1.data's images) and the labelled training images alone (the labels-only twin's)."""
    d = recipe.data
    if not d.path:
        raise ConfigError("data.path is empty: give --data DIR (a RetinaBench folder or an image folder)")
    index = open_index(d.path, d.task)
    spec = d.preprocess_spec()
    aug = None
    if d.augment:
        from mirage_edge.data.transforms import AugmentConfig

        aug = AugmentConfig()
    splits = set(index.splits)

    def samples(idx: Any, split: str | None, labels: bool = True, limit: int = d.limit) -> DistillSamples:
        return DistillSamples(idx, split, spec, teacher.modalities, labels=labels, views=d.views, augment=aug,
                              aug_seed=d.aug_seed, limit=limit)

    def train_of(folder: str, limit: int = 0) -> DistillSamples:
        """An extra folder's images, unlabelled: its train split if it has one, else all of it."""
        idx = open_index(folder, "none")
        return samples(idx, d.train_split if d.train_split in idx.splits else None, labels=False, limit=limit)

    def split(name: str) -> DistillSamples | None:
        return DistillSamples(index, name, spec, teacher.modalities) if name in splits else None

    train_split = d.train_split if d.train_split in splits else None
    labelled = samples(index, train_split)
    train1 = train_of(recipe.stage1.data, d.limit) if recipe.stage1.data else labelled
    train = labelled.with_unlabelled(train_of(recipe.stage2.data)) if recipe.stage2.data else labelled
    return train, split(d.val_split), split(d.test_split), train1, labelled


def distill(recipe: DistillRecipe, *, resume: bool = False, overwrite: bool = False,
            log: Log | None = None) -> DistillResult:
    """Run the recipe end to end (see module docstring); returns paths and the test report.

    Under torchrun every stage trains data-parallel through the trainer (each rank reads its share of
    every global batch); rank 0 alone owns the output folder (checks, --overwrite, --resume, reports,
    artifacts) and fills the teacher cache, the other ranks wait for it and get its errors."""
    from mirage_edge.train import distributed as D

    info = D.env_dist_info()
    D.init_distributed(D.resolve_device(recipe.run.device, info), info)
    log = (log or progress) if info.is_main else (lambda m: None)
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    torch.manual_seed(recipe.run.seed)
    t_start = time.perf_counter()
    # resolve teacher and data first: a bad --teacher / --data must not leave an output folder behind
    teacher = build_teacher(recipe, log)
    train, val, test, train1, labelled = _datasets(recipe, teacher)
    out = D.on_main(lambda: _prepare_out(recipe, resume, overwrite))
    task = recipe.data.labelled_task(train.task)
    log(f"teacher {recipe.teacher.model} ({teacher.task or 'encoder'}, D={teacher.embed_dim}, grid {teacher.grid}, "
        f"sees {teacher.modalities}); student {recipe.student.name}; data {recipe.data.path} "
        f"({len(train)} train, task {task or 'none'})"
        + (f"; stage 1 on {recipe.stage1.data} ({len(train1)} images)" if recipe.stage1.data else "")
        + (f"; stage 2 adds {len(train) - train.n_labelled} unlabelled images of {recipe.stage2.data}"
           if recipe.stage2.data else "")
        + (f"; the recipe's settings for {recipe.student.name}: "
           + " ".join(f"{k}={json.dumps(v)}" for k, v in recipe.applied_per_student.items())
           if recipe.applied_per_student else ""))

    from mirage_edge.models.students import build_student

    # re-seeded here: building the teacher draws from the global RNG as many numbers as its architecture
    # has parameters, and the student (and its twin) must start alike whatever the teacher is
    torch.manual_seed(recipe.run.seed)
    init_rng = torch.get_rng_state()  # the labels-only twin starts from the same backbone weights
    student = build_student(recipe.student.name, img_size=recipe.data.hw,
                            input_scale=recipe.student.input_scale)
    _check_stage2(teacher, student, recipe.stage2, val is not None)
    layer_map = {int(k): int(v) for k, v in recipe.student.layer_map.items()}
    missing = [t for t in layer_map if t not in teacher.layers]
    if missing:
        raise ConfigError(f"student.layer_map uses teacher blocks {missing} not listed in teacher.layers {teacher.layers}")
    proj = ProjectedStudent(student, teacher.embed_dim, teacher.grid, teacher.num_global_tokens, layer_map,
                            upsample=recipe.student.upsample)
    report: dict[str, Any] = {"recipe": recipe.name, "teacher": teacher.describe(), "task": task,
                              "student": recipe.student.name, "stages": {}}

    # ---------------------------------------------------------------- stage 1
    s1 = recipe.stage1
    if s1.epochs > 0:
        stats = attach_cache(train1, teacher, recipe, False, log) if recipe.cache.enabled else None
        fcfg = s1.loss

        def loss1(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
            tgt = _online_targets(teacher, batch, False)
            tokens, inter = model(batch["bscan"])  # TrainForward: forward_distill
            loss, parts = feature_loss(tokens, tgt["tokens"], fcfg)
            for i, s_tok in inter.items():
                li, _ = feature_loss(s_tok, tgt[f"l{i}"], fcfg)
                loss = loss + s1.layer_weight * li
                parts[f"l{i}"] = float(li.detach())
            return loss, parts

        def eval1(model: nn.Module) -> dict[str, float]:
            return {"val_cos": ev.feature_cosine(val, unwrap(model).forward_features, teacher,
                                                 recipe.run.eval_batch_size)} if val is not None else {}

        summary = run_stage("stage1", proj, loss1, train1, s1, recipe, out, resume, log, eval1,
                            train_module=TrainForward(proj, lambda m, x: m.forward_distill(x)))
        train1.cache = None
        report["stages"]["stage1"] = {**summary, "cache": stats}

    # ---------------------------------------------------------------- stage 2
    final: nn.Module = proj
    s2 = recipe.stage2
    if teacher.task and task and s2.epochs > 0:
        final = _task_student(teacher, proj, student, s2)
        stats = attach_cache(train, teacher, recipe, True, log) if recipe.cache.enabled else None
        short = "seg" if task == "segmentation" else "cls"

        def loss2_with(tcfg: Any) -> Callable:
            def loss2(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
                tgt = _online_targets(teacher, batch, True)
                logits, tokens = model(batch["bscan"])  # TrainForward: logits, tokens for the token term
                loss, parts = task_kd_loss(logits, tgt["logits"], batch.get("label"), short, tcfg)
                if tokens is not None:
                    fl, _ = feature_loss(tokens, tgt["tokens"], s1.loss)
                    loss = loss + tcfg.feature * fl
                    parts["feat"] = float(fl.detach())
                return loss, parts

            return loss2

        with_tokens = bool(s2.loss.feature) and isinstance(getattr(final, "encoder", None), ProjectedStudent)
        train2 = TrainForward(final, lambda m, x: (m(x), m.encoder.forward_features(x) if with_tokens else None))
        monitor = "val_metric" if val is not None else None
        if len(s2.alpha_grid) > 1:
            summary = _alpha_search(final, train2, loss2_with, train, val, task, recipe, out, resume, log)
        else:
            tcfg = dataclasses.replace(s2.loss, alpha=s2.alpha_grid[0]) if s2.alpha_grid else s2.loss
            summary = run_stage("stage2", final, loss2_with(tcfg), train, s2, recipe, out, resume, log,
                                _val_metric(val, task, recipe), monitor, train_module=train2)
        if s2.calibrate:
            summary["calibration"] = _calibrate(final, val, task, recipe, log, "stage2")
        train.cache = None
        report["stages"]["stage2"] = {**summary, "cache": stats}
    elif s2.epochs > 0 and task and not teacher.task:
        log("stage 2 skipped: the teacher is an encoder without a fine-tuned head")

    _deploy_form(student, recipe)
    final.eval()
    meta = {"classes": train.index.classes, "preprocess": cfgmod.to_dict(train.spec), "teacher": teacher.describe(),
            "recipe": recipe.to_dict()}
    student_dir = D.on_main(lambda: save_student(final, out / "student", meta))
    log(f"FP32 student saved to {student_dir}")

    # ---------------------------------------------------------------- QAT
    int8_dir = onnx_path = None
    if recipe.qat.enabled:
        from mirage_edge.distill.qat_stage import run_qat

        int8_dir, onnx_path, qinfo = run_qat(final, train, task, recipe, out, resume, meta, log)
        report["stages"]["qat"] = qinfo

    # ---------------------------------------------------------------- labels-only twin
    twin = twin_onnx = None
    if recipe.baseline.enabled:
        if teacher.task and task:
            twin, twin_onnx, report["stages"]["baseline"] = _train_twin(
                _twin_model(teacher, recipe, layer_map, init_rng), labelled, val, task, recipe, out, resume, meta, log)
            report["validation"] = _validation_pick(report["stages"], log)
        else:
            log("baseline skipped: the labels-only twin needs labels and a fine-tuned teacher's head type")

    # ---------------------------------------------------------------- test report
    def finish() -> dict[str, Any]:
        if test is not None:  # once, on rank 0: the whole test split
            report["test"] = test_report(teacher, final, onnx_path, test, task, recipe, twin, twin_onnx)
        report["seconds"] = time.perf_counter() - t_start
        report["world_size"] = info.world_size
        atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=_json_default))
        log(f"report: {out / 'report.json'}")
        return report

    return DistillResult(out, student_dir, int8_dir, onnx_path, D.on_main(finish))


def _validation_pick(stages: dict[str, Any], log: Log) -> dict[str, Any] | None:
    """Which of the distilled student and its labels-only twin to ship, decided on the val split (the
    same data and metric that chose the KD weight), so that shipping the product's student is never
    worse than no teacher where validation can tell. None without a validation metric."""
    # after calibration, each as it ships
    vd, vb = (stages.get(k, {}).get("calibration", {}).get("val_after", stages.get(k, {}).get("best"))
              for k in ("stage2", "baseline"))
    if vd is None or vb is None:
        return None
    ship = "baseline" if vb > vd else "student"
    if ship == "baseline":
        log(f"validation: the labels-only twin beats the distilled student ({vb:.4f} > {vd:.4f}); ship baseline/ "
            "(baseline_int8/): the teacher did not help this student on validation")
    return {"distilled": vd, "baseline": vb, "ship": ship}


def _json_default(o: Any) -> Any:
    """Paths, numpy scalars and other non-JSON leaves of the report become strings / numbers."""
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _val_metric(val: DistillSamples | None, task: str, recipe: DistillRecipe) -> Callable | None:
    """Validation for a task stage: the headline metric (Dice / BAcc) on the val split, if any, scored
    as the test split is (segmentation masks at their own size), so what picks a checkpoint or a KD
    weight is what the report reads."""
    if val is None:
        return None
    truth: list[Any] = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        logits, labels = ev.collect(val, unwrap(model), recipe.run.eval_batch_size)
        if not truth:
            truth.append(ev.native_truth(task, labels, val))
        return {"val_metric": ev.headline(task, ev.task_metrics(task, logits, truth[0], val, hd95=False))[1]}

    return evaluate


def _calibrate(model: nn.Module, val: DistillSamples | None, task: str, recipe: DistillRecipe, log: Log,
               who: str) -> dict[str, Any]:
    """stage2.calibrate: choose the foreground logit offset on val (scored as `_val_metric`) and fold it
    into `model`'s head (`mirage_edge.models.calibrate`). Deterministic, so a resumed run folds the same one."""
    from mirage_edge import metrics
    from mirage_edge.models import calibrate

    assert val is not None and task == "segmentation"  # _check_stage2
    logits, labels = ev.collect(val, unwrap(model), recipe.run.eval_batch_size)
    truth = ev.native_truth(task, labels, val)
    classes, ignore = ev.seg_classes(val, logits.shape[1])
    res = calibrate.choose_offset(
        logits, metrics.scored_classes(classes, ignore),
        lambda lg: ev.headline(task, ev.task_metrics(task, lg, truth, val, hd95=False))[1])
    calibrate.fold_offset(unwrap(model), res["classes"], res["offset"])
    log(f"{who}: {calibrate.describe(res)}")
    return res


def _alpha_search(model: nn.Module, train_module: nn.Module, loss_with: Callable, train: DistillSamples,
                  val: DistillSamples | None, task: str, recipe: DistillRecipe, out: Path, resume: bool,
                  log: Log) -> dict[str, Any]:
    """Stage 2 once per KD weight of `stage2.alpha_grid` (folders stage2_alpha<a>), each from the same
    starting weights and data order; `model` ends with the weights of the best validation metric."""
    s2 = recipe.stage2
    if val is None:
        raise ConfigError("stage2.alpha_grid picks the KD weight on validation data, but the data has no "
                          f"{recipe.data.val_split!r} split")
    start = copy.deepcopy(model.state_dict())
    tried: dict[str, Any] = {}
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    for a in s2.alpha_grid:
        model.load_state_dict(start)
        summary = run_stage(f"stage2_alpha{a:g}", model, loss_with(dataclasses.replace(s2.loss, alpha=a)), train,
                            s2, recipe, out, resume, log, _val_metric(val, task, recipe), "val_metric",
                            train_module=train_module)
        tried[f"{a:g}"] = summary
        log(f"stage2: alpha {a:g} -> best val {summary['best']:.4f}")
        if best is None or summary["best"] > best[1]:
            best = (a, summary["best"], copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    log(f"stage2: KD weight alpha {best[0]:g} chosen on validation ({best[1]:.4f})")
    chosen = tried[f"{best[0]:g}"]
    return {**chosen, "alpha": best[0], "alpha_search": {a: t["best"] for a, t in tried.items()}}


def _deploy_form(student: nn.Module, recipe: DistillRecipe) -> None:
    if recipe.student.reparameterize and student.cfg.timm_name.startswith(("mobileone", "repvit", "fastvit")):
        student.reparameterize()  # deploy form for evaluation, QAT and export


def _twin_model(teacher: Teacher, recipe: DistillRecipe, layer_map: dict[int, int],
                rng_state: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """(task model, its backbone): the distilled student's architecture, untrained - the backbone and
    projector from the RNG state the distilled student was built from (the same initial weights);
    the head a fresh one of the teacher head's type and size (its config only, never its weights)."""
    from mirage_edge.models.heads import build_head
    from mirage_edge.models.students import build_student
    from mirage_edge.models.task import TASK_CLASSES

    torch.set_rng_state(rng_state)
    student = build_student(recipe.student.name, img_size=recipe.data.hw,
                            input_scale=recipe.student.input_scale)
    proj = ProjectedStudent(student, teacher.embed_dim, teacher.grid, teacher.num_global_tokens, layer_map,
                            upsample=recipe.student.upsample)
    if recipe.stage2.mode == "drop_in":
        tm = teacher.model
        return TASK_CLASSES[tm.task](proj, build_head(dict(tm.head.config))).train(), student
    return _task_student(teacher, proj, student, recipe.stage2), student  # new_head: a fresh head already


def _train_twin(arch: tuple[nn.Module, nn.Module], labelled: DistillSamples, val: DistillSamples | None,
                task: str, recipe: DistillRecipe, out: Path, resume: bool, meta: dict[str, Any],
                log: Log) -> tuple[nn.Module, Path | None, dict[str, Any]]:
    """Train the labels-only twin (recipe.baseline) on the labelled images; no teacher is passed in,
    so none can be used. Saves `out/baseline` (FP32) and, with QAT, `out/baseline_int8`.
    Returns (FP32 twin, its Q/DQ ONNX or None, stage summary)."""
    twin, backbone = arch
    b, s1, s2 = recipe.baseline, recipe.stage1, recipe.stage2
    spec = dataclasses.replace(s2, epochs=b.epochs or (max(0, s1.epochs) + s2.epochs), lr=b.lr or s2.lr,
                               max_steps=0 if b.epochs or not s2.max_steps else s1.max_steps + s2.max_steps)
    short = "seg" if task == "segmentation" else "cls"
    log(f"baseline: the labels-only twin of {recipe.student.name}, {spec.epochs} epochs at lr {spec.lr:g} "
        f"on {len(labelled)} labelled images")

    def loss_b(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return label_loss(model(batch["bscan"]), batch["label"], short, dice=s2.loss.dice,
                          class_weights=s2.loss.class_weights)

    summary = run_stage("baseline_stage", twin, loss_b, labelled, spec, recipe, out, resume, log,
                        _val_metric(val, task, recipe), "val_metric" if val is not None else None)
    if s2.calibrate:  # as the distilled student is
        summary["calibration"] = _calibrate(twin, val, task, recipe, log, "baseline")
    _deploy_form(backbone, recipe)
    twin.eval()
    bmeta = {**meta, "teacher": None, "labels_only": True}
    from mirage_edge.train import distributed as D

    D.on_main(lambda: save_student(twin, out / "baseline", bmeta))
    log(f"baseline: FP32 twin saved to {out / 'baseline'}")
    onnx_path = None
    if recipe.qat.enabled and b.qat:
        from mirage_edge.distill.qat_stage import run_qat

        _, onnx_path, qinfo = run_qat(twin, labelled, task, recipe, out, resume, bmeta, log,
                                      stage="baseline_qat", out_name="baseline_int8")
        summary = {**summary, "qat": qinfo}
    return twin, onnx_path, summary


def _check_stage2(teacher: Teacher, student: nn.Module, s2: Stage2Spec, has_val: bool) -> None:
    """Stage-2 settings that cannot fit this teacher and student, refused before stage 1 spends time."""
    from mirage_edge.models.task import check_fpn_encoder

    if not teacher.task:
        return
    if s2.calibrate and (teacher.task != "segmentation" or not has_val):
        raise ConfigError("stage2.calibrate chooses a segmentation logit offset on validation data: it needs a "
                          f"segmentation teacher (this one: {teacher.task}) and a val split in data.path")
    k = int(teacher.model.num_classes)
    if s2.loss.class_weights and len(s2.loss.class_weights) != k:
        raise ConfigError(f"stage2.loss.class_weights has {len(s2.loss.class_weights)} weights but the teacher's "
                          f"head has {k} classes")
    if s2.mode == "new_head" and teacher.task == "segmentation" and s2.head.get("type") == "fpn":
        check_fpn_encoder(student)


def _task_student(teacher: Teacher, proj: ProjectedStudent, student: nn.Module, s2: Stage2Spec) -> nn.Module:
    """Task model for stage 2: the teacher's head on the projected tokens, or a fresh head."""
    from mirage_edge.models.task import TASK_CLASSES, classification_model, segmentation_model

    tm = teacher.model
    if s2.mode == "drop_in":
        head = copy.deepcopy(tm.head).requires_grad_(not s2.freeze_head)
        return TASK_CLASSES[tm.task](proj, head).train()
    k = int(tm.num_classes)
    if tm.task == "segmentation" and s2.head.get("type") == "fpn":
        from mirage_edge.models.task import fpn_segmentation_model

        extra = {k2: v for k2, v in s2.head.items() if k2 != "type"}
        try:
            return fpn_segmentation_model(student, k, **extra).train()
        except TypeError as exc:
            raise ConfigError(f"stage2.head {s2.head}: {exc}") from None
    if tm.task == "segmentation":
        cfg = {k2: v for k2, v in tm.head.config.items() if k2 not in ("type", "in_dim", "num_classes")}
        try:
            return segmentation_model(student, k, **{**cfg, **s2.head}).train()
        except TypeError as exc:
            raise ConfigError(f"stage2.head {s2.head}: {exc}") from None
    return classification_model(student, k, pool="global").train()


def test_report(teacher: Teacher, fp32: nn.Module, onnx_path: Path | None, test: DistillSamples,
                task: str | None, recipe: DistillRecipe, twin: nn.Module | None = None,
                twin_onnx: Path | None = None) -> dict[str, Any]:
    """Teacher / FP32 / INT8-ORT metrics on the test split, retention and agreement; with the
    labels-only twin, its metrics and the KD gain (distilled - twin, bootstrap 95% CI)."""
    bs = recipe.run.eval_batch_size
    # every form below is scored on exactly these images, in this order (ids hashed: an archive has many)
    ids = "\n".join(s.id for s in test.samples)
    rep: dict[str, Any] = {"n": len(test), "images_sha256": hashlib.sha256(ids.encode()).hexdigest()}
    enc = getattr(fp32, "encoder", fp32)
    if isinstance(enc, ProjectedStudent):
        rep["feature_cosine"] = ev.feature_cosine(test, enc.forward_features, teacher, bs)
    if onnx_path is not None and not (task and teacher.task and hasattr(fp32, "head")):
        from mirage_edge.distill.qat import ort_predict, ort_session

        sess = ort_session(onnx_path, recipe.run.threads)
        rep["int8_feature_cosine"] = ev.feature_cosine(
            test, lambda x: next(ort_predict(sess, [x])), teacher, bs)
    if not (task and teacher.task and hasattr(fp32, "head")):
        return rep
    t_logits, labels = ev.collect(test, teacher.model, bs)
    s_logits, _ = ev.collect(test, fp32, bs)
    if labels is None:
        raise DataError(f"test split of {recipe.data.path} has no labels")
    labels = ev.native_truth(task, labels, test)  # segmentation: scored at each mask's own size
    mt, ms = ev.task_metrics(task, t_logits, labels, test), ev.task_metrics(task, s_logits, labels, test)
    key, tv = ev.headline(task, mt)
    sv = ms[key]
    ci = ev.compare(task, s_logits, t_logits, labels, test, seed=recipe.run.seed)
    rep.update(metric=key, teacher=mt, student_fp32=ms, teacher_value=tv, student_value=sv,
               retention=sv / tv if tv else float("nan"), agreement_fp32=ev.agreement(task, s_logits, t_logits),
               student_ci95=ci["a_ci"], teacher_ci95=ci["b_ci"], ci_unit=ci["unit"])
    q_logits = None
    if onnx_path is not None:
        q_logits = _ort_logits(onnx_path, test, recipe)
        mq = ev.task_metrics(task, q_logits, labels, test)
        rep.update(student_int8_ort=mq, int8_value=mq[key], int8_minus_fp32_points=100.0 * (mq[key] - sv),
                   agreement_int8=ev.agreement(task, q_logits, t_logits),
                   int8_vs_fp32_agreement=ev.agreement(task, q_logits, s_logits))
    if twin is not None:
        b_logits, _ = ev.collect(test, twin, bs)
        mb = ev.task_metrics(task, b_logits, labels, test)
        gain = ev.compare(task, s_logits, b_logits, labels, test, seed=recipe.run.seed)
        rep.update(baseline_fp32=mb, baseline_value=mb[key], baseline_ci95=gain["b_ci"],
                   kd_gain_points=100.0 * (sv - mb[key]), kd_gain_ci95_points=[100.0 * v for v in gain["diff_ci"]])
        if twin_onnx is not None and q_logits is not None:
            bq_logits = _ort_logits(twin_onnx, test, recipe)
            mbq = ev.task_metrics(task, bq_logits, labels, test)
            gq = ev.compare(task, q_logits, bq_logits, labels, test, seed=recipe.run.seed)
            rep.update(baseline_int8_ort=mbq, baseline_int8_value=mbq[key],
                       kd_gain_int8_points=100.0 * (mq[key] - mbq[key]),
                       kd_gain_int8_ci95_points=[100.0 * v for v in gq["diff_ci"]])
        if mb[key] > tv:
            rep["teacher_weaker_than_baseline"] = (
                f"the teacher ({key} {tv:.4f}) is weaker than the same student trained on labels alone "
                f"({mb[key]:.4f}): retention of the teacher is no evidence of a good student here")
    return rep


def _ort_logits(onnx_path: Path, test: DistillSamples, recipe: DistillRecipe) -> np.ndarray:
    from mirage_edge.distill.qat import ort_predict, ort_session

    sess = ort_session(onnx_path, recipe.run.threads)
    return ev.collect(test, lambda x: next(ort_predict(sess, [x])), recipe.run.eval_batch_size)[0]


__all__ = ["distill", "DistillResult", "fill_cache", "cache_cost", "attach_cache", "test_report", "cache_root"]
