"""Deployments the bench builds itself: a suite model's `export` targets, exported once and cached.

A `[[models]]` entry with ``export = ["teacher-cpu-openvino-int8"]`` (plus optional ``export_set``
target overrides, e.g. ``["seg_argmax=true", "seg_mask_stride=4"]``) gets one artifact row per
(format, precision) of each target, timed in the same run as every other row. The artifacts are
exported, with the target's validation, from the entry's `registry` name (seeded random weights,
the same as its PyTorch row, with a fresh head of the task's kind and class count; `head` options
apply) or its `checkpoint` folder (calibrated and validated on the task's images), at each timed
input size.

Cache: ``<export_cache>/<key>/<format>-<precision>/`` (default ``$MIRAGE_EDGE_HOME/cache/bench-artifacts``),
``key`` = SHA-256 over the weights hash of the built model (every parameter and buffer, head
included), the resolved target (formats, precisions, quantization recipe, input size, output
contract, validation) and the calibration source. A cached folder whose checksums verify is reused;
``key.json`` beside it says what the key was made of. Building the model to hash it costs seconds
(MIRAGE-Large: a few); exporting costs minutes, once.

Runs in the bench process or, isolated, as ``python -m mirage_edge.bench.deploy SPEC.json OUT.json``.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

CACHE_VERSION = 1
TASK_NAMES = {"seg": "segmentation", "cls": "classification"}


def default_cache_dir() -> Path:
    """``$MIRAGE_EDGE_HOME/cache/bench-artifacts`` (``~/.cache/mirage-edge/...`` by default)."""
    from mirage_edge.models.weights import cache_dir

    return cache_dir() / "cache" / "bench-artifacts"


def job_target(job: dict[str, Any]) -> Any:
    """The `ExportTarget` of an export job: the named target, the suite's `export_set`, then the
    job's input size and task (torch-free, so the bench can filter by format/precision first)."""
    from mirage_edge.export.target import load_target

    size = int(job["input_size"])
    sets = [*job.get("sets", []), f"input_size=[{size}, {size}]"]
    if job["source_kind"] == "registry":
        sets.append(f'task="{TASK_NAMES.get(job.get("task_kind", ""), "encoder")}"')
    return load_target(job["target"], sets)


def cache_key(weights_sha256: str, target: dict[str, Any], calib: str) -> str:
    """16 hex digits of SHA-256 over what decides the artifact: weights, target, calibration data."""
    blob = json.dumps({"version": CACHE_VERSION, "weights_sha256": weights_sha256, "target": target,
                       "calib": calib}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _complete(folders: list[Path]) -> bool:
    from mirage_edge.artifact import load_verified_meta
    from mirage_edge.errors import MirageEdgeError

    try:
        for f in folders:
            load_verified_meta(f)
    except MirageEdgeError:
        return False
    return True


def build_or_reuse(job: dict[str, Any], log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export `job`'s model to its target into the cache, or reuse the cached artifacts.

    job: label, source_kind ("registry" | "checkpoint"), source, task_kind, num_classes, head,
    target (name or path), sets, input_size, calib (a folder or None = generated images), cache.
    Returns {"key", "folder", "artifacts": [paths], "reused", "seconds", "weights", "weights_sha256"}.
    Raises MirageEdgeError (a ValidationError with the numbers when an artifact fails validation).
    """
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    target = job_target(job)
    size = int(job["input_size"])
    if job["source_kind"] == "registry":
        from mirage_edge.export.registered import registered_model

        task = TASK_NAMES.get(job.get("task_kind", ""), "auto")
        n_cls = (job.get("num_classes") or 2) if task != "auto" else None
        reg = registered_model(job["source"], task=task, num_classes=n_cls, head=job.get("head") or {},
                               random_weights=True, input_size=(size, size))
        model, source, build, classes, preprocess = reg.model, reg.source, reg.build, None, None
    else:
        from mirage_edge.distill.teacher import weights_hash
        from mirage_edge.export.cli import load_source_model

        model, source, classes, preprocess = load_source_model(job["source"], (size, size))
        build = {"weights": "trained", "weights_sha256": weights_hash(model)}
    calib = job.get("calib") or None
    calib_desc = str(Path(calib).resolve()) if calib else "generated"
    key = cache_key(build["weights_sha256"], target.to_dict(), calib_desc)
    folder = Path(job["cache"]).expanduser() / key
    wanted = [folder / f"{fmt}-{prec}" for fmt, prec in target.combos()]
    reused = _complete(wanted)
    if reused:
        say(f"{job['label']}: reusing {folder} (weights {build['weights_sha256'][:12]}, target {target.name})")
    else:
        from mirage_edge.export.api import export_model

        say(f"{job['label']}: exporting {job['source']} to {target.name} at {size}x{size} -> {folder}")
        export_model(model, folder, target, calib=calib, classes=classes, preprocess=preprocess, source=source,
                     name=str(job.get("label") or target.name), log=lambda m: say(f"  {m}"), build_info=build)
        from mirage_edge._io import atomic_write_text

        atomic_write_text(folder / "key.json", json.dumps({
            "key": key, "version": CACHE_VERSION, "model": job["source"], "weights": build.get("weights"),
            "weights_sha256": build["weights_sha256"], "calib": calib_desc, "target": target.to_dict()},
            indent=1) + "\n")
    return {"key": key, "folder": str(folder), "artifacts": [str(p) for p in wanted], "reused": reused,
            "seconds": time.perf_counter() - t0, "weights": str(build.get("weights", "")),
            "weights_sha256": build["weights_sha256"]}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m mirage_edge.bench.deploy SPEC.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    try:
        payload: dict[str, Any] = {"result": build_or_reuse(job, log=lambda m: print(m, file=sys.stderr, flush=True))}
    except BaseException as exc:  # noqa: BLE001 - the parent turns it into an error row
        text = f"{type(exc).__name__}: {exc}"
        payload = {"error": text if len(text) < 800 else text[:800] + "...", "traceback": traceback.format_exc()}
    from mirage_edge._io import atomic_write_text

    atomic_write_text(args[1], json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_or_reuse", "cache_key", "job_target", "default_cache_dir", "CACHE_VERSION"]
