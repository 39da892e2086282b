"""Process group, device and precision handling for single-process and torchrun (DDP) runs.

`torchrun --nproc-per-node N -m mirage_edge.cli train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we then
join a process group (NCCL when the device is CUDA, gloo on CPU). Without those variables every
helper here degrades to the single-process case, so the same code path serves both.
Nothing defaults to CUDA: the device is whatever the config names; "auto" is an explicit opt-in.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from mirage_edge.errors import ConfigError, MirageEdgeError

T = TypeVar("T")

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def resolve_device(spec: str, info: DistInfo | None = None) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'mps' | 'auto' -> torch.device; fails clearly if unavailable.

    'cuda' under torchrun means this process's LOCAL_RANK GPU. 'auto' picks CUDA only if present.
    """
    info = info or env_dist_info()
    spec = (spec or "").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"'device' is {spec!r} but CUDA is not available here; use device=\"cpu\"")
        if spec == "cuda":
            index = info.local_rank if info.distributed else torch.cuda.current_device()
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError as exc:
                raise ConfigError(f"'device' {spec!r} is not cpu, cuda, cuda:N, mps or auto") from exc
        if index >= torch.cuda.device_count():
            raise ConfigError(f"'device' {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if spec == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("'device' is 'mps' but MPS is not available here")
        return torch.device("mps")
    raise ConfigError(f"'device' must be cpu, cuda, cuda:N, mps or auto, got {spec!r}")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """'fp32' -> None (no autocast); 'bf16'/'fp16' -> the autocast dtype, checked against the device."""
    if precision not in PRECISIONS:
        raise ConfigError(f"'precision' must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("'precision' fp16 needs a GPU; use bf16 or fp32 on cpu")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def init_distributed(device: torch.device, info: DistInfo | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo otherwise); idempotent."""
    import datetime

    info = info or env_dist_info()
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return info


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group; `wait=False` after an error (the other ranks may never arrive: torchrun
    stops them when this process exits)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum scalar metrics over ranks (identity in a single process). Keys must match on every rank."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-item list in a single process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (so all ranks take the same decision, e.g. early stopping)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only (writes of shared files: an output folder, a report, an export); every
    rank returns its result, or raises its error - a MirageEdgeError as the same class and message,
    so no rank waits forever for a rank that failed. `fn`'s result must pickle."""
    if not is_dist():
        return fn()
    result: Any = None
    failure: tuple[type, str] | None = None
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below on every rank
            error, failure = exc, (type(exc), str(exc))
    result, failure = broadcast_object((result, failure))
    if error is not None:
        raise error
    if failure is not None:
        cls, msg = failure
        raise (cls(msg) if isinstance(cls, type) and issubclass(cls, MirageEdgeError)
               else MirageEdgeError(f"rank 0 failed: {cls.__name__}: {msg}"))
    return result


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """torch.autocast for bf16/fp16, a no-op for fp32."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


__all__ = [
    "DistInfo", "env_dist_info", "resolve_device", "resolve_precision", "init_distributed",
    "shutdown_distributed", "is_dist", "barrier", "all_reduce_sum", "all_gather_objects",
    "broadcast_object", "autocast", "PRECISIONS",
]
