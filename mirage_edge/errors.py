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


class WeightsChecksumError(CheckpointError):
    """A weights file does not match the SHA-256 known for it (altered, corrupt or not the official file)."""


class InputError(MirageEdgeError, ValueError):
    """Bad model input: wrong modality, shape, dtype, channel count, NaN."""

    exit_code = 2


class DataError(MirageEdgeError):
    """A dataset problem: unreadable image, mask values outside INFO.json, size mismatch, empty split."""


class VolumeFormatError(DataError):
    """An OCT volume file that cannot be read: unknown format, truncated or damaged, or not an OCT scan."""


class VolumeShapeError(DataError):
    """An OCT volume whose B-scans do not form one N x H x W stack (B-scans of different sizes)."""


class VoxelSizeError(InputError):
    """A measurement needs the voxel size in mm, and the volume has none (or an invalid one)."""


class MeasurementError(InputError):
    """A model whose task or classes do not fit the requested measurement (e.g. fluid volume from a
    layer model)."""


class ExportError(MirageEdgeError):
    """An export step failed (conversion, quantization, engine build)."""


class ValidationError(ExportError):
    """An exported artifact disagrees with PyTorch beyond the target's thresholds; carries the numbers."""

    def __init__(self, message: str, numbers: dict | None = None) -> None:
        super().__init__(message)
        self.numbers = dict(numbers or {})


class ArtifactError(MirageEdgeError):
    """An artifact folder is incomplete, corrupted or tampered with (SHA256SUMS mismatch)."""


class OutputError(MirageEdgeError, OSError):
    """An output path cannot be written: a file where a folder goes, read-only, permission, full disk,
    or a non-empty folder that would mix two runs. The message names the path; `errno` and `filename`
    are kept, and it is an `OSError` too, so code that handles write failures as OSError still does."""

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # type: ignore[assignment]
        self.filename = filename

    def __str__(self) -> str:  # OSError would print "[Errno N] ..." once errno/filename are set
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # keep errno and filename across processes (synth workers)
        return (type(self), (str(self), self.errno, self.filename))


class MissingDependencyError(MirageEdgeError, ImportError):
    """An optional package is not installed; the message names the extra to install."""

    exit_code = 3
