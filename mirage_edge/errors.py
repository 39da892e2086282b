"""Typed errors: one class per failure kind a user must tell apart.

The CLI maps every `MirageEdgeError` to a one-line message and `exit_code`; `--debug` shows the
traceback. Messages name the file, key or value at fault and, where possible, the fix.
"""
from __future__ import annotations


class MirageEdgeError(Exception):
    """Base of every error mirage-edge raises on purpose."""

    exit_code = 1


class ConfigError(MirageEdgeError, ValueError):
    """A config file, recipe, target or suite is malformed (unknown key, wrong type, bad value)."""

    exit_code = 2


class ModelNotFoundError(MirageEdgeError, KeyError):
    """An unknown model name; the message suggests close matches."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(MirageEdgeError):
    """A checkpoint that cannot be read or does not fit the model (missing/unexpected keys, shapes)."""


class WeightsNotFoundError(CheckpointError):
    """Official weights were not found locally and could not be downloaded."""


class InputError(MirageEdgeError, ValueError):
    """Bad model input: wrong modality, shape, dtype, channel count, NaN."""

    exit_code = 2


class DataError(MirageEdgeError):
    """A dataset problem: unreadable image, mask values outside INFO.json, size mismatch, empty split."""


class ExportError(MirageEdgeError):
    """An export step failed (conversion, quantization, engine build)."""


class ValidationError(ExportError):
    """An exported artifact disagrees with PyTorch beyond the target's thresholds; carries the numbers."""

    def __init__(self, message: str, numbers: dict | None = None) -> None:
        super().__init__(message)
        self.numbers = dict(numbers or {})


class ArtifactError(MirageEdgeError):
    """An artifact folder is incomplete, corrupted or tampered with (SHA256SUMS mismatch)."""


class MissingDependencyError(MirageEdgeError, ImportError):
    """An optional package is not installed; the message names the extra to install."""

    exit_code = 3
