"""One distillation stage (stage 1, stage 2 or QAT) run by the generic trainer, resumable.

`run_stage` is shared by `mirage_edge.distill.loop` (stages 1 and 2) and
`mirage_edge.distill.qat_stage`: a run folder per stage with the trainer's metrics and checkpoints,
then `final.safetensors` + `DONE.json`, which a resumed run reloads instead of training again.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mirage_edge._io import atomic_path, atomic_write_text
from mirage_edge.distill.data import DistillSamples, collate
from mirage_edge.distill.precise_bn import recalibrate_bn as recalibrate_bn_
from mirage_edge.distill.precise_bn import recalibration_batches
from mirage_edge.distill.recipe import DistillRecipe
from mirage_edge.errors import CheckpointError
from mirage_edge.train import distributed as D
from mirage_edge.train.checkpoint import unwrap
from mirage_edge.train.config import LoopConfig
from mirage_edge.train.engine import Trainer
from mirage_edge.train.optim import CosineSchedule

Log = Callable[[str], None]


class TrainForward(nn.Module):
    """`fn(model, x)` as a module's forward (shares `model`'s parameters).

    Under torchrun DDP averages the gradients of what runs through the forward of the module it
    wraps; a loss that calls `model.forward_distill(x)` (stage 1's token maps) or a second encoder
    pass (stage 2's token term) around it trains each rank on its own gradients. So the loss
    calls this module (the trainer's `train_module`) instead."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self.model, x)


def _loop_config(recipe: DistillRecipe, stage: Any) -> LoopConfig:
    r = recipe.run
    return LoopConfig(device=r.device, epochs=max(1, stage.epochs), max_steps=stage.max_steps,
                      batch_size=stage.batch_size, seed=r.seed, log_every=r.log_every,
                      checkpoint_every=r.checkpoint_every, progress=r.progress, num_workers=r.num_workers,
                      threads=r.threads, eval_every=r.eval_every or max(1, stage.epochs))


def run_stage(name: str, model: nn.Module, loss_fn: Callable, ds: DistillSamples, stage: Any,
              recipe: DistillRecipe, out: Path, resume: bool, log: Log,
              evaluate: Callable | None = None, monitor: str | None = None,
              recalibrate_bn: bool = True, train_module: nn.Module | None = None) -> dict[str, Any]:
    """Train `model` for one stage with the generic Trainer; reuse a finished stage on resume.

    BatchNorm statistics are re-estimated on training images (`run.precise_bn` batches) before
    every validation (so `best/` holds them) and once more on the weights the stage ends with
    (unless `recalibrate_bn` is False: a stage that trained with frozen statistics keeps them).

    `stage` is the recipe section of the stage (Stage1Spec, Stage2Spec or QATSpec: epochs,
    batch_size, lr ...); the run folder is `out/name`. `loss_fn(m, batch)` gets `train_module`
    (a `TrainForward` around `model`; default `model`), DDP-wrapped under torchrun. Returns the
    stage summary (DONE.json).
    """
    bn_inputs = (recalibration_batches(ds, recipe.run.precise_bn, recipe.run.eval_batch_size)
                 if recalibrate_bn else [])

    def recalibrate(m: nn.Module) -> None:
        if recalibrate_bn:
            recalibrate_bn_(unwrap(m), bn_inputs)

    def evaluate_(m: nn.Module) -> dict[str, float]:
        recalibrate(m)
        return evaluate(m) if evaluate is not None else {}

    run_dir = out / name
    done = run_dir / "DONE.json"
    final = run_dir / "final.safetensors"
    if done.is_file() and final.is_file():
        if not resume:
            raise CheckpointError(f"{run_dir} already holds a finished stage; pass resume=True (--resume) "
                                  f"or use a new output folder")
        model.load_state_dict(load_file(str(final)), strict=True)
        log(f"{name}: finished earlier, weights reloaded from {final}")
        return json.loads(done.read_text())
    loop = _loop_config(recipe, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    n_steps = (len(ds) // stage.batch_size) * stage.epochs
    total = min(n_steps, stage.max_steps) if stage.max_steps else n_steps
    sched = CosineSchedule(base_lr=stage.lr, total_steps=max(1, total), warmup_steps=stage.warmup_steps,
                           min_lr=stage.lr * 0.01)

    def save_weights(m: nn.Module, d: Path) -> None:
        with atomic_path(d / "model.safetensors") as tmp:
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in m.state_dict().items()}, str(tmp))
        atomic_write_text(d / "config.json", json.dumps({"format": "mirage-edge-distill-stage", "stage": name}))

    trainer = Trainer(model, loss_fn, ds, loop=loop, optimizer=opt, schedule=sched, run_dir=run_dir,
                      evaluate=evaluate_ if evaluate is not None else None, monitor=monitor, mode="max",
                      config=recipe.to_dict(), collate_fn=collate,
                      save_model_fn=save_weights, description=f"distill {name}", train_module=train_module,
                      # under DDP: a projector's global-token / intermediate-block branches, a twin's
                      # unused layer projectors and NNCF quantizers of float branches get no gradient
                      find_unused_parameters=True)
    res = trainer.fit(resume="auto" if resume else None)
    model.eval()
    if monitor and res.best_dir is not None and (res.best_dir / "model.safetensors").is_file():
        # best/ was saved right after its (recalibrated) evaluation: its BN statistics are current
        model.load_state_dict(load_file(str(res.best_dir / "model.safetensors")), strict=True)
        log(f"{name}: using best {monitor} {res.best_metric:.4f} (step {res.best_step})")
    else:
        recalibrate(model)  # the last weights (a no-op for BN-free models)
    summary = {"steps": res.steps, "seconds": res.seconds, "samples_per_s": res.samples_per_s,
               "last_loss": res.last_loss, "best": res.best_metric, "history": res.history}

    def finish() -> None:  # rank 0 writes; the other ranks hold the same weights
        with atomic_path(final) as tmp:
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        atomic_write_text(done, json.dumps(summary, default=str))
        # a finished stage resumes from final.safetensors: its optimizer-state checkpoints (0.1-0.5 GB
        # each for a CNN student) are never read again
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    D.on_main(finish)
    return summary


__all__ = ["run_stage", "Log", "TrainForward"]
