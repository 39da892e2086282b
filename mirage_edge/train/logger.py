"""Run feedback: JSONL metric log, optional TensorBoard, rich progress bar, one-line summary.

Only rank 0 creates a `MetricLogger` that writes; other ranks get a silent one, so callers never
branch on the rank themselves.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from mirage_edge._log import quiet
from mirage_edge._deps import has


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricLogger:
    """Append every metric record to `<run_dir>/metrics.jsonl` (+ TensorBoard when asked and installed).

    `log(event, step, **values)` writes one JSON line `{"event", "step", "time", **values}` and flushes,
    so a killed run keeps everything logged so far.
    """

    def __init__(self, run_dir: str | Path | None, *, enabled: bool = True, tensorboard: bool = False,
                 console: Any = None) -> None:
        self.enabled = enabled and run_dir is not None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._fh = None
        self._tb = None
        self.console = console
        self.messages: list[str] = []
        if not self.enabled:
            return
        assert self.run_dir is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            if has("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            else:
                self.info("tensorboard=true but the 'tensorboard' package is not installed "
                          "(pip install tensorboard); metrics go to metrics.jsonl only")

    def info(self, message: str) -> None:
        """A human-readable line on stderr (rank 0 only)."""
        self.messages.append(message)
        if not self.enabled or quiet():
            return
        if self.console is not None:
            self.console.print(message, highlight=False, markup=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def log(self, event: str, step: int, **values: Any) -> None:
        if not self.enabled or self._fh is None:
            return
        rec = {"event": event, "step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _jsonable(v) for k, v in values.items()})
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in values.items():
                v = _jsonable(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{event}/{k}", v, int(step))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A rich progress bar over optimizer steps (throughput, ETA, latest loss); silent when disabled
    or when stderr is not a terminal (CI logs get the periodic JSONL/console lines instead)."""

    def __init__(self, total: int, *, enabled: bool = True, description: str = "train") -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._p = None
        self._task = None
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._p = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self._task = self._p.add_task(description, total=total, info="")
        self._p.start()

    @property
    def console(self) -> Any:
        return self._p.console if self._p is not None else None

    def update(self, completed: int, info: str = "") -> None:
        if self._p is not None:
            self._p.update(self._task, completed=completed, info=info)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


__all__ = ["MetricLogger", "Progress"]
