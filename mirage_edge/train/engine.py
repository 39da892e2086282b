"""The generic training loop: DDP, autocast, accumulation, clipping, schedule, checkpoints, resume.

Model-agnostic: it trains any `nn.Module` with a `loss_fn(model, batch) -> (loss, logs)` over any
map-style dataset. Pretraining, fine-tuning and distillation all run through `Trainer.fit`.

Exact resume: the data order is a pure function of (seed, epoch) (a DistributedSampler
permutation), each sample's augmentation RNG is seeded from (seed, epoch, index) (`SeededDataset`),
and checkpoints store the step, the position inside the epoch and every rank's RNG state. A run
resumed from a mid-epoch checkpoint therefore replays exactly the batches and random draws the
uninterrupted run would have made.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mirage_edge.errors import CheckpointError, MirageEdgeError
from mirage_edge.train import distributed as D
from mirage_edge.train.checkpoint import (SaveModelFn, capture_rng_state, checkpoint_name, latest_checkpoint,
                                          load_checkpoint, prune_checkpoints, save_checkpoint)
from mirage_edge.train.config import LoopConfig
from mirage_edge.train.logger import MetricLogger, Progress
from mirage_edge.train.optim import CosineSchedule

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]
EvalFn = Callable[[nn.Module], "dict[str, float]"]


# ------------------------------------------------------------------------------ data plumbing


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 63-bit seed for one sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1, 1 << 32], dtype=np.uint64)) & ((1 << 63) - 1))


class SeededDataset(Dataset):
    """Wraps a dataset so item `(index, seed)` is loaded with python/numpy/torch RNGs seeded by `seed`.

    Makes augmentation independent of worker count and of where a resumed run starts. In the main
    process the global RNG states are saved and restored around the call.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class ResumableSampler(DistributedSampler):
    """DistributedSampler (works with world size 1 too) that yields `(index, sample_seed)` and can start
    part-way through an epoch (`set_start(n)`: skip this rank's first n samples, for this epoch only)."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._start = 0

    def set_start(self, n: int) -> None:
        self._start = max(0, int(n))

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self._start:]
        return iter([(int(i), sample_seed(self.seed, self.epoch, int(i))) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self._start)


def move_to(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors in dicts/lists/tuples to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def shard_indices(n: int) -> list[int]:
    """This rank's share of range(n) for evaluation (strided, no padding, so nothing is counted twice)."""
    rank = torch.distributed.get_rank() if D.is_dist() else 0
    world = torch.distributed.get_world_size() if D.is_dist() else 1
    return list(range(rank, n, world))


def steps_per_epoch(n_samples: int, loop: LoopConfig, world_size: int) -> int:
    """Optimizer steps in one epoch (incomplete global batches are dropped)."""
    micro = loop.micro_batch(world_size)
    per_rank = n_samples // world_size
    return (per_rank // micro) // loop.grad_accum


# ------------------------------------------------------------------------------------ trainer


@dataclass
class FitResult:
    """What `Trainer.fit` returns (on every rank)."""

    steps: int
    epochs_done: int
    seconds: float
    samples_per_s: float
    last_loss: float
    best_metric: float | None
    best_step: int | None
    best_dir: Path | None
    last_dir: Path | None
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Train `model` with `loss_fn` on `train_set`; evaluate/checkpoint/resume as `loop` says.

    Args:
        model: the module (moved to the device here; wrapped in DDP under torchrun).
        loss_fn: `loss_fn(model, batch) -> (loss, logs)`; `batch` is already on the device and runs
            under autocast; `logs` values (floats or 0-d tensors) are averaged over the log window
            and over ranks.
        train_set: map-style dataset; items are collated by `collate_fn` (default torch's).
        loop: LoopConfig. optimizer: built over `model`'s parameters (before or after `.to`, both fine).
        schedule: per-step LR (`CosineSchedule`); None keeps the optimizer's LRs.
        run_dir: where metrics.jsonl, checkpoints/ and best/ go (rank 0 writes).
        evaluate: `evaluate(model) -> metrics`, called on every rank after each `loop.eval_every`
            epochs (inside no_grad + eval mode); use `shard_indices` + `D.all_gather_objects` inside.
        monitor / mode: the metric that picks `best/` and drives early stopping (`loop.patience`).
        config: the full run config, stored in every checkpoint.
        save_model_fn: writes the model part of a checkpoint (default: mirage_edge.models.save_model).
        train_module: what `loss_fn` runs and DDP wraps when it is not `model` itself, e.g. a wrapper
            whose forward computes a loss around `model` (masked pretraining, a student + frozen
            teacher). Checkpoints and `evaluate` still see `model`; `optimizer` must cover what trains.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, train_set: Dataset, *, loop: LoopConfig,
        optimizer: torch.optim.Optimizer, schedule: CosineSchedule | None = None,
        run_dir: str | Path, evaluate: EvalFn | None = None, monitor: str | None = None,
        mode: str = "max", config: dict[str, Any] | None = None, collate_fn: Callable | None = None,
        save_model_fn: SaveModelFn | None = None, find_unused_parameters: bool = False,
        description: str = "train", train_module: nn.Module | None = None,
    ) -> None:
        self.loop = loop
        self.info = D.env_dist_info()
        self.device = D.resolve_device(loop.device, self.info)
        self.amp_dtype = D.resolve_precision(loop.precision, self.device)
        D.init_distributed(self.device, self.info)
        if loop.threads:
            torch.set_num_threads(loop.threads)
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.best_dir = self.run_dir / "best"
        self.loss_fn, self.evaluate, self.monitor, self.mode = loss_fn, evaluate, monitor, mode
        if mode not in ("max", "min"):
            raise MirageEdgeError(f"monitor mode must be 'max' or 'min', got {mode!r}")
        self.config = config or {}
        self.save_model_fn = save_model_fn
        self.description = description
        self.micro = loop.micro_batch(self.info.world_size)
        self.model = model.to(self.device)
        self.train_module = (train_module if train_module is not None else model).to(self.device)
        self.optimizer = optimizer
        self.schedule = schedule
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ddp_model: nn.Module = self.train_module
        if self.info.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)
        self.sampler = ResumableSampler(train_set, num_replicas=self.info.world_size, rank=self.info.rank,
                                        shuffle=True, seed=loop.seed, drop_last=True)
        # a private generator: creating a DataLoader iterator draws a base seed, which must not
        # consume the global RNG (a resumed run creates its iterator at a different point)
        self._loader_gen = torch.Generator()
        self.loader = DataLoader(SeededDataset(train_set), batch_size=self.micro, sampler=self.sampler,
                                 num_workers=loop.num_workers, collate_fn=collate_fn, drop_last=True,
                                 pin_memory=self.device.type == "cuda", generator=self._loader_gen)
        self.steps_per_epoch = steps_per_epoch(len(train_set), loop, self.info.world_size)  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise MirageEdgeError(
                f"the training set has {len(train_set)} samples, fewer than one global batch "  # type: ignore[arg-type]
                f"(loop.batch_size={loop.batch_size}); lower the batch size or add data")
        full = self.steps_per_epoch * loop.epochs
        self.total_steps = min(full, loop.max_steps) if loop.max_steps else full
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "samples": 0,
                                      "best": None, "best_step": None, "patience_ref": None, "bad_evals": 0,
                                      "history": [], "stopped_early": False}
        self.logger = MetricLogger(self.run_dir, enabled=self.info.is_main, tensorboard=loop.tensorboard)

    # ------------------------------------------------------------------ checkpoints

    def _rng_all_ranks(self) -> list[dict[str, Any]]:
        return D.all_gather_objects(capture_rng_state())

    def save(self, path: Path) -> None:
        """Collective: every rank calls it (RNG states are gathered); rank 0 writes `path`."""
        rng = self._rng_all_ranks()
        if self.info.is_main:
            save_checkpoint(path, self.model, optimizer=self.optimizer, scheduler=self.schedule,
                            scaler=self.scaler, state=self._public_state(), config=self.config, rng=rng,
                            save_model_fn=self.save_model_fn)
        D.barrier()

    def _public_state(self) -> dict[str, Any]:
        s = dict(self.state)
        s.update(world_size=self.info.world_size, seed=self.loop.seed, batch_size=self.loop.batch_size,
                 grad_accum=self.loop.grad_accum, total_steps=self.total_steps,
                 steps_per_epoch=self.steps_per_epoch)
        return s

    def resume(self, path: str | Path) -> None:
        """Restore model, optimizer, schedule, scaler, loop position and this rank's RNG from `path`."""
        path = Path(path)
        doc = load_checkpoint(path, self.model, optimizer=self.optimizer, scheduler=self.schedule,
                              scaler=self.scaler, restore_rng=True, rank=self.info.rank)
        st = doc["state"]
        for key in ("batch_size", "grad_accum", "seed"):
            if key in st and st[key] != getattr(self.loop, key):
                raise CheckpointError(f"cannot resume {path}: it was trained with loop.{key}={st[key]}, "
                                      f"this run has {getattr(self.loop, key)}")
        if st.get("world_size", 1) != self.info.world_size:
            self.logger.info(f"note: resuming a {st.get('world_size')}-process run on "
                             f"{self.info.world_size} process(es); data order is kept, RNG streams are not")
        for key in ("step", "epoch", "micro_in_epoch", "samples", "best", "best_step", "bad_evals", "history",
                    "stopped_early"):
            if key in st:
                self.state[key] = st[key]
        self.state["patience_ref"] = st.get("patience_ref", self.state["best"])  # checkpoints from before it
        self.logger.info(f"resumed from {path} at step {self.state['step']} (epoch {self.state['epoch']})")

    # ------------------------------------------------------------------ loop

    def _better(self, value: float, than: float | None, delta: float = 0.0) -> bool:
        if than is None:
            return True
        return value > than + delta if self.mode == "max" else value < than - delta

    def _run_eval(self) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        was_training = self.train_module.training
        self.train_module.eval()
        self.model.eval()
        with torch.no_grad(), D.autocast(self.device, self.amp_dtype):
            metrics = self.evaluate(self.model)
        self.train_module.train(was_training)
        return D.broadcast_object(metrics)

    def fit(self, resume: str | Path | None = None) -> FitResult:
        """Run to `total_steps` (or early stop). `resume`: a checkpoint folder, or "auto" for the latest
        one under run_dir/checkpoints (starting fresh if there is none)."""
        if resume:
            path = latest_checkpoint(self.ckpt_root) if str(resume) == "auto" else Path(resume)
            if path is not None:
                self.resume(path)
            elif str(resume) != "auto":
                raise CheckpointError(f"resume checkpoint not found: {resume}")
        loop, st = self.loop, self.state
        progress = Progress(self.total_steps, enabled=loop.progress and self.info.is_main,
                            description=self.description)
        if progress.console is not None:
            self.logger.console = progress.console
        self.logger.info(
            f"{self.description}: {self.total_steps} steps ({self.steps_per_epoch}/epoch), global batch "
            f"{loop.batch_size} = {self.info.world_size} proc x {self.micro} x accum {loop.grad_accum}, "
            f"device {self.device}, precision {loop.precision}, run dir {self.run_dir}")
        self.train_module.train()
        t_start = time.perf_counter()
        start_step = st["step"]
        window: dict[str, float] = {}
        win_n, win_t, win_samples = 0, time.perf_counter(), 0
        last_loss = math.nan
        stopped = bool(st.get("stopped_early"))  # resuming a run that already stopped early: done
        last_dir: Path | None = None
        progress.update(st["step"])
        try:
            while st["step"] < self.total_steps and not stopped:
                epoch = st["epoch"]
                self.sampler.set_epoch(epoch)
                self.sampler.set_start(st["micro_in_epoch"] * self.micro)
                self._loader_gen.manual_seed(loop.seed * 1000003 + epoch)
                micro_left = self.steps_per_epoch * loop.grad_accum - st["micro_in_epoch"]
                it = iter(self.loader)
                for _ in range(micro_left // loop.grad_accum):
                    logs = self._train_step(it)
                    st["step"] += 1
                    st["micro_in_epoch"] += loop.grad_accum
                    st["samples"] += loop.batch_size
                    win_samples += loop.batch_size
                    for k, v in logs.items():
                        window[k] = window.get(k, 0.0) + v
                    win_n += 1
                    step = st["step"]
                    if step % loop.log_every == 0 or step == self.total_steps:
                        red = D.all_reduce_sum({k: v / win_n for k, v in window.items()}, self.device)
                        red = {k: v / self.info.world_size for k, v in red.items()}
                        dt = max(time.perf_counter() - win_t, 1e-9)
                        last_loss = red.get("loss", math.nan)
                        rec = dict(red, lr=self._lr(), samples_per_s=win_samples / dt, epoch=epoch)
                        if self.device.type == "cuda":
                            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                        self.logger.log("train", step, **rec)
                        progress.update(step, f"loss {last_loss:.4f}  {win_samples / dt:.1f} img/s")
                        if not progress.enabled:
                            self.logger.info(f"step {step}/{self.total_steps} loss {last_loss:.4f} "
                                             f"lr {rec['lr']:.2e} {win_samples / dt:.1f} img/s")
                        window, win_n, win_t, win_samples = {}, 0, time.perf_counter(), 0
                    else:
                        progress.update(step)
                    at_end = step >= self.total_steps
                    epoch_done = st["micro_in_epoch"] >= self.steps_per_epoch * loop.grad_accum
                    # mid-epoch checkpoint; the end of an epoch / of the run saves below anyway
                    if loop.checkpoint_every and step % loop.checkpoint_every == 0 and not (at_end or epoch_done):
                        last_dir = self._periodic()
                    if at_end:
                        break
                if st["micro_in_epoch"] >= self.steps_per_epoch * loop.grad_accum:
                    st["epoch"] += 1
                    st["micro_in_epoch"] = 0
                    stopped = self._end_of_epoch(st["epoch"])
                    st["stopped_early"] = stopped
                    # checkpoint_every = 0: every epoch end; else only on its multiples (+ the very end)
                    if (not loop.checkpoint_every or st["step"] % loop.checkpoint_every == 0
                            or st["step"] >= self.total_steps or stopped):
                        last_dir = self._periodic()
                elif st["step"] >= self.total_steps:
                    # ended mid-epoch (max_steps): evaluate once and keep the final state
                    stopped = self._end_of_epoch(st["epoch"], force=True) or stopped
                    last_dir = self._periodic()
        finally:
            progress.close()
        seconds = time.perf_counter() - t_start
        done = st["step"] - start_step
        result = FitResult(
            steps=st["step"], epochs_done=st["epoch"], seconds=seconds,
            samples_per_s=done * loop.batch_size / max(seconds, 1e-9), last_loss=last_loss,
            best_metric=st["best"], best_step=st["best_step"],
            best_dir=self.best_dir if st["best"] is not None else None, last_dir=last_dir,
            stopped_early=stopped and st["step"] < self.total_steps, history=list(st["history"]))
        best = (f", best {self.monitor} {st['best']:.4f} at step {st['best_step']} -> {self.best_dir}"
                if st["best"] is not None else "")
        self.logger.info(
            f"done: {self.description} {st['step']} steps in {seconds:.1f} s "
            f"({result.samples_per_s:.1f} img/s), final loss {last_loss:.4f}{best}"
            + (" (early stop)" if result.stopped_early else ""))
        self.logger.log("summary", st["step"], seconds=seconds, samples_per_s=result.samples_per_s,
                        last_loss=last_loss, best=st["best"], best_step=st["best_step"],
                        stopped_early=result.stopped_early)
        self.logger.close()
        return result

    def _lr(self) -> float:
        g = self.optimizer.param_groups[0]
        return float(g["lr"]) / float(g.get("lr_scale", 1.0) or 1.0)

    def _train_step(self, it: Iterator) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns the averaged logs."""
        loop = self.loop
        if self.schedule is not None:
            self.schedule.apply(self.optimizer, self.state["step"])
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for m in range(loop.grad_accum):
            batch = move_to(next(it), self.device)
            sync = m == loop.grad_accum - 1 or not self.info.distributed
            ctx = self.ddp_model.no_sync() if not sync else _null()  # type: ignore[operator]
            with ctx:
                with D.autocast(self.device, self.amp_dtype):
                    loss, extra = self.loss_fn(self.ddp_model, batch)
                if not torch.isfinite(loss.detach()):
                    raise MirageEdgeError(
                        f"loss is {loss.item()} at step {self.state['step'] + 1}; lower optim.lr, "
                        f"enable loop.clip_grad, or use precision fp32/bf16")
                self.scaler.scale(loss / loop.grad_accum).backward()
            logs["loss"] = logs.get("loss", 0.0) + float(loss.detach()) / loop.grad_accum
            for k, v in extra.items():
                v = v.detach() if isinstance(v, torch.Tensor) else v
                logs[k] = logs.get(k, 0.0) + float(v) / loop.grad_accum
        if loop.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], loop.clip_grad)
            logs["grad_norm"] = float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logs

    def _end_of_epoch(self, epochs_done: int, force: bool = False) -> bool:
        """Evaluate (every eval_every epochs), keep the best, decide early stopping (same on all ranks)."""
        st = self.state
        if self.evaluate is None or (not force and epochs_done % self.loop.eval_every != 0):
            return False
        metrics = self._run_eval()
        entry = {"step": st["step"], "epoch": epochs_done, **metrics}
        st["history"].append(entry)
        self.logger.log("eval", st["step"], epoch=epochs_done, **metrics)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        self.logger.info(f"eval epoch {epochs_done} step {st['step']}: {shown}")
        if not self.monitor:
            return False
        if self.monitor not in metrics:
            raise MirageEdgeError(f"monitor metric {self.monitor!r} not among evaluation metrics {sorted(metrics)}")
        value = float(metrics[self.monitor])
        # best/ follows every improvement; only patience asks for more than min_delta, measured from the
        # last value that reset it (so a reconstruction loss of 0.01 is not frozen by a 0.001 step)
        if self._better(value, st["best"]):
            st["best"], st["best_step"] = value, st["step"]
            self.save(self.best_dir)
        if self._better(value, st["patience_ref"], self.loop.min_delta):
            st["patience_ref"], st["bad_evals"] = value, 0
        elif epochs_done > self.loop.patience_start_epoch:
            # official MIRAGE EarlyStopping: `epoch >= start_from` with 0-based epochs
            st["bad_evals"] += 1
        return bool(self.loop.patience and st["bad_evals"] >= self.loop.patience)

    def _periodic(self) -> Path:
        path = self.ckpt_root / checkpoint_name(self.state["step"])
        self.save(path)
        if self.info.is_main:
            prune_checkpoints(self.ckpt_root, self.loop.keep_checkpoints)
        return path


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def load_trained(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load only the weights of a training checkpoint folder into `model`; returns its trainer state."""
    return load_checkpoint(path, model)


__all__ = ["Trainer", "FitResult", "SeededDataset", "ResumableSampler", "move_to", "shard_indices",
           "steps_per_epoch", "sample_seed", "load_trained"]
