"""Progress lines of long work (training, distillation, bench, export), quiet under `mirage-edge -q`.

Progress is printed, not logged: a Python user who never configures logging still sees a training
run advance. Setting the `mirage_edge` logger above INFO (what `-q` does, or
`logging.getLogger("mirage_edge").setLevel(logging.WARNING)` in a program) silences it, so one switch
quiets the toolkit's logging and its progress alike.
"""
from __future__ import annotations

import logging
import sys


def quiet() -> bool:
    """True when the `mirage_edge` logger is set above INFO."""
    return logging.getLogger("mirage_edge").level > logging.INFO


def progress(message: str) -> None:
    """One progress line on stderr, unless `quiet()`."""
    if not quiet():
        print(message, file=sys.stderr, flush=True)


__all__ = ["quiet", "progress"]
