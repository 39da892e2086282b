"""`export_model`: nn.Module -> validated artifact folders, one per (format, precision).

Flow per model: plan (task, inputs, classes) -> calibration/validation inputs through the
artifact's preprocessing -> torch reference outputs -> one fp32 ONNX (or the QAT Q/DQ ONNX) ->
per (format, precision): convert/quantize -> run in its runtime and compare with torch ->
metadata (+ embedded copy) -> SHA256SUMS -> atomic rename into `out_dir/<format>-<precision>`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mirage_edge import __version__
from mirage_edge._deps import require
from mirage_edge.artifact import ArtifactMeta, QuantizationInfo, SourceInfo, TensorSpec
from mirage_edge.data.preprocess import PreprocessSpec
from mirage_edge.errors import ConfigError, ExportError, ValidationError
from mirage_edge.export import onnx as onnx_x
from mirage_edge.export import validate as val
from mirage_edge.export.data import ExportData, load_export_data
from mirage_edge.export.target import ExportTarget, load_target
from mirage_edge.export.wrap import ExportPlan, plan_export
from mirage_edge._io import check_output_dir
from mirage_edge.export.writer import finalize, publish, staging_dir
from mirage_edge.models.quantized import qdq_summary

_VERSION_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxslim", "openvino", "nncf", "tensorrt", "numpy", "timm")


def export_model(
    model: Any,
    out_dir: str | Path,
    target: ExportTarget | str | Path | None = None,
    *,
    calib: str | Path | None = None,
    task: str | None = None,
    classes: list[str] | None = None,
    preprocess: PreprocessSpec | dict[str, Any] | None = None,
    source: SourceInfo | None = None,
    name: str = "",
    overwrite: bool = True,
    log: Callable[[str], None] | None = None,
    build_info: dict[str, Any] | None = None,
) -> list[Path]:
    """Export `model` (any nn.Module taking B x 1 x H x W, or a MIRAGE encoder) to validated artifacts.

    target:     an `ExportTarget`, a TOML path or curated target name (default: ONNX fp32).
    calib:      image folder for INT8 calibration and validation inputs (RetinaBench layouts give
                labels for the task metric); None = generated OCT-like images.
    preprocess: the `PreprocessSpec` (size is forced to the export input size); default from
                the target's [preprocess] table, min-max scaling (after resize for classification).
    build_info: facts about the weights stored in every artifact's `build` (e.g. a registered
                model's {"weights": "random (seed 0)", "weights_sha256": ...}).
    Returns the artifact folders `out_dir/<format>-<precision>` in target order. Raises
    `ValidationError` (with the numbers) when an artifact disagrees with torch beyond the target's
    thresholds; nothing is written for that artifact.
    """
    torch = require("torch", "export")
    say = log or (lambda msg: None)
    if not isinstance(target, ExportTarget):
        target = load_target(target) if target is not None else ExportTarget()
    out_dir = Path(out_dir)
    check_output_dir(out_dir)  # before minutes of export work, not at the first file written
    plan = plan_export(model, target, task=task, classes=classes)
    if plan.fake_quantized and any(p != "int8" for p in target.precisions):
        raise ExportError(f"the model is fake-quantized ({plan.fake_quantized} QAT); it exports to int8 only, "
                          f"not {[p for p in target.precisions if p != 'int8']}")
    specs = _preprocess_specs(plan, target, preprocess, model)
    q = target.quantization
    want_int8 = "int8" in target.precisions
    n_calib = q.calib_images if want_int8 and not plan.fake_quantized else 1
    data = load_export_data(calib, specs, n_calib=n_calib, n_val=target.validation.n_inputs, task=plan.task,
                            n_classes=len(plan.classes), calib_batch=1 if target.batch.dynamic else target.batch.opt,
                            seed=q.seed)
    say(f"{plan.task} model, inputs {plan.input_sizes}, output {plan.output_kind} {plan.output_shape}; "
        f"data: {data.source}")
    ref = _torch_outputs(torch, plan, data.val, target)
    ref_metric = (val.task_metric(plan.task, plan.output_kind, ref, data.val_labels, plan.classes, data.val_volumes)
                  if data.val_labels is not None else None)

    qat_ref = _qat_reference(model) if plan.fake_quantized else None
    results: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as work_s:
        work = Path(work_s)
        base = work / "base.onnx"  # fp32 graph, or the QAT Q/DQ graph
        build = onnx_x.export_torch_to_onnx(plan, base, target)
        say(f"ONNX export ({build['exporter']}, opset {build['opset']}) done")
        int8_cache: dict[str, tuple[Path, QuantizationInfo]] = {}
        for fmt, prec in target.combos():
            final = out_dir / f"{fmt}-{prec}"
            say(f"building {final.name}")
            with staging_dir(final) as stage:
                files, qinfo, extra_build, hints = _build_one(
                    fmt, prec, plan, target, base, stage, work, data, int8_cache)
                if prec == "int8":
                    qinfo = _count_written(fmt, stage, qinfo)
                    say(f"{final.name}: {qinfo.quantizers} quantizers, {qinfo.compute_ops_quantized} of "
                        f"{qinfo.compute_ops_total} compute ops quantized ({qinfo.counted_in})")
                    if target.validation.enabled:
                        val.check_quantized(qinfo, target.validation, f"{fmt}-{prec} artifact", qat_ref)
                numbers = _validate(fmt, prec, plan, target, stage, files, hints, data, ref, ref_metric)
                say(f"{final.name}: " + ", ".join(f"{k}={v:.6g}" for k, v in numbers.items()
                                                  if isinstance(v, float)))
                facts = {**(build_info or {}), **build, **extra_build}
                meta = _meta(plan, target, fmt, prec, files, specs, qinfo, facts, hints, numbers, data, source, name)
                _embed(fmt, stage, files, meta, work)
                finalize(stage, meta)
                results.append(publish(stage, final, overwrite=overwrite))
    return results


# ------------------------------------------------------------------------------------------ helpers
def _preprocess_specs(plan: ExportPlan, target: ExportTarget, given: PreprocessSpec | dict | None,
                      model: Any) -> dict[str, PreprocessSpec]:
    if isinstance(given, PreprocessSpec):
        base = given.to_dict()
    elif isinstance(given, dict):
        base = dict(given)
    else:
        own = getattr(model, "preprocess_spec", None)
        base = own.to_dict() if isinstance(own, PreprocessSpec) else {}
    if "minmax_order" not in base and "minmax_order" not in target.preprocess:
        # MIRAGE fine-tuning: classification scales after resizing, segmentation before.
        base["minmax_order"] = "after_resize" if plan.task == "classification" else "before_resize"
    base.update(target.preprocess)  # the target's [preprocess] table has the last word
    out = {}
    for m, hw in plan.input_sizes.items():
        try:
            out[m] = PreprocessSpec.from_dict({**base, "size": list(hw)}, source="export preprocessing")
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad preprocessing settings {base}: {exc}") from exc
    return out


def _torch_outputs(torch: Any, plan: ExportPlan, inputs: dict[str, np.ndarray], target: ExportTarget) -> np.ndarray:
    """Reference outputs of the torch model (wrapper) on the validation inputs, in batches."""
    n = next(iter(inputs.values())).shape[0]
    step = target.batch.max if target.batch.dynamic else target.batch.opt
    outs = []
    with torch.no_grad():
        for i in range(0, n, step):
            xs = [torch.from_numpy(np.ascontiguousarray(inputs[m][i:i + step])) for m in plan.modalities]
            outs.append(plan.wrapper(*xs).cpu().numpy())
    return np.concatenate(outs)


def _int8_onnx(plan: ExportPlan, target: ExportTarget, base: Path, work: Path, data: ExportData, fmt: str,
               cache: dict[str, tuple[Path, QuantizationInfo]]) -> tuple[Path, QuantizationInfo]:
    """The Q/DQ ONNX for int8 artifacts: the QAT export itself, or PTQ (ORT / NNCF) of the fp32 graph."""
    q = target.quantization
    if plan.fake_quantized:
        quantized, floating = qdq_summary(base)
        return base, QuantizationInfo(method=f"qat-{plan.fake_quantized}", op_types_quantized=sorted(quantized),
                                      float_ops=floating, quantized_ops=quantized, activation_type="from QAT",
                                      weight_type="from QAT", calibration_source="QAT (training-time)")
    if q.method == "qat":
        raise ExportError("quantization.method = 'qat' but the model has no fake-quantizers; pass the QAT "
                          "model from `mirage-edge distill --qat` or choose method 'ort'/'nncf'")
    method = q.method if q.method != "auto" else ("nncf" if fmt == "openvino" else "ort")
    if fmt == "tensorrt":
        method = "ort-trt"  # TensorRT: symmetric signed activations, zero point 0
    if method in cache:
        return cache[method]
    dst = work / f"int8-{method}.onnx"
    if method == "nncf":
        info = onnx_x.quantize_nncf_onnx(base, dst, data.calib, q, _transformer(plan, target))
    else:
        qq = q
        if method == "ort-trt":
            qq = dataclasses.replace(q, activation_type="QInt8", symmetric_activations=True)
        info = onnx_x.quantize_ort(base, dst, data.calib, qq, work)
    info.calibration_source = data.source
    info.notes.extend(data.notes)
    cache[method] = (dst, info)
    return dst, info


def _transformer(plan: ExportPlan, target: ExportTarget) -> bool:
    mt = target.quantization.model_type
    return plan.has_attention if mt == "auto" else mt == "transformer"


def _build_one(fmt: str, prec: str, plan: ExportPlan, target: ExportTarget, base: Path, stage: Path, work: Path,
               data: ExportData, cache: dict) -> tuple[list[str], QuantizationInfo | None, dict, dict]:
    """Write the model file(s) of one artifact into `stage`; returns (files, quant info, build facts, hints)."""
    from mirage_edge.export import openvino as ov_x

    build: dict[str, Any] = {}
    # ONNX artifacts may run on OpenVINO too. An fp32 artifact computes in f32 whatever the target asks
    # for the float ops of quantized ones (bf16 on a CPU that has it would make the label untrue).
    float_ops = "f32" if prec == "fp32" else target.openvino.inference_precision
    hints: dict[str, dict[str, Any]] = {"openvino": ov_x.runtime_hints(float_ops)}
    qinfo = None
    if fmt == "onnx":
        dst = stage / "model.onnx"
        if prec == "fp32":
            shutil.copyfile(base, dst)
        elif prec == "fp16":
            build.update(onnx_x.convert_fp16(base, dst))
        else:
            src, qinfo = _int8_onnx(plan, target, base, work, data, fmt, cache)
            shutil.copyfile(src, dst)
            if plan.fake_quantized:  # the QAT graph itself; PTQ files were finalized by their quantizer
                rewrites = onnx_x.finalize_onnx(dst, uint8_activations=True)
                if rewrites:
                    build["onnx_artifact_rewrites"] = rewrites
        return ["model.onnx"], qinfo, build, hints
    if fmt == "openvino":
        if prec == "int8":
            method = target.quantization.method
            if plan.fake_quantized or method in ("ort", "qat"):
                src, qinfo = _int8_onnx(plan, target, base, work, data, fmt, cache)
                qinfo = dataclasses.replace(qinfo, notes=[*qinfo.notes, "OpenVINO IR converted from the Q/DQ "
                                                          f"ONNX ({qinfo.method}); counts are the IR's"])
                model = ov_x.convert(src)
            else:
                model, qinfo = ov_x.quantize_nncf(ov_x.convert(base), data.calib, target.quantization,
                                                  _transformer(plan, target))
                qinfo.calibration_source = data.source
                qinfo.notes.extend(data.notes)
        else:
            model = ov_x.convert(base)
        files = ov_x.save(model, stage / "model.xml", None, compress_to_fp16=(prec == "fp16"))
        return files, qinfo, build, hints
    if fmt == "tensorrt":
        from mirage_edge.export import tensorrt as trt_x

        if prec == "fp32":
            src = base
        elif prec == "fp16":
            src = base
        else:
            src, qinfo = _int8_onnx(plan, target, base, work, data, fmt, cache)
            # an engine cannot be inspected portably: count the Q/DQ ONNX it is built from
            qinfo = onnx_x.count_quantization(src, dataclasses.replace(qinfo),
                                              "the Q/DQ ONNX the engine was built from")
        shapes = {m: (1, *plan.input_sizes[m]) for m in plan.modalities}
        build.update(trt_x.build_engine(src, stage / "model.engine", prec, shapes, target, work))
        hints = {"tensorrt": {"device": target.tensorrt.device}}
        return ["model.engine"], qinfo, build, hints
    raise ConfigError(f"unknown format {fmt!r}")


def _count_written(fmt: str, stage: Path, qinfo: QuantizationInfo | None) -> QuantizationInfo:
    """The quantization record with counts taken from the written model file (a copy: the PTQ
    cache shares one record between the ONNX and OpenVINO artifacts)."""
    from mirage_edge.export import openvino as ov_x

    info = dataclasses.replace(qinfo) if qinfo is not None else QuantizationInfo(method="none")
    if fmt == "onnx":
        return onnx_x.count_quantization(stage / "model.onnx", info, "model.onnx")
    if fmt == "openvino":
        return ov_x.count_quantization(stage / "model.xml", info, "model.xml")
    return info  # tensorrt: counted on its source ONNX in _build_one


def _qat_reference(model: Any) -> tuple[int, str] | None:
    """(quantized compute ops, path) of a QAT student's distill-time Q/DQ ONNX, when it has one:
    every artifact exported from that student must quantize at least as many."""
    path = getattr(model, "mirage_edge_qat_onnx", None)
    if not path or not Path(path).is_file():
        return None
    quantized, _ = qdq_summary(Path(path))
    return sum(quantized.values()), f"the distill-time Q/DQ ONNX {path}"


def _validate(fmt: str, prec: str, plan: ExportPlan, target: ExportTarget, stage: Path, files: list[str],
              hints: dict, data: ExportData, ref: np.ndarray, ref_metric: dict[str, float] | None) -> dict[str, Any]:
    """Run the staged artifact in its runtime on the validation inputs and compare with torch."""
    from mirage_edge.runtime.backends import model_file, open_backend

    backend = open_backend(model_file(stage, fmt, files), fmt, runtime_hints=hints)
    n = next(iter(data.val.values())).shape[0]
    step = target.batch.max if target.batch.dynamic else target.batch.opt
    out_name = backend.output_names[0]
    got = np.concatenate([
        backend.run({m: np.ascontiguousarray(data.val[m][i:i + step]) for m in plan.modalities})[out_name]
        for i in range(0, n, step)
    ])
    numbers: dict[str, Any] = val.parity_numbers(plan.task, plan.output_kind, ref, got.astype(ref.dtype, copy=False),
                                                 len(plan.classes))
    if ref_metric is not None and data.val_labels is not None:
        art = val.task_metric(plan.task, plan.output_kind, got, data.val_labels, plan.classes, data.val_volumes)
        for k, v in ref_metric.items():
            numbers[f"torch_{k}"] = v
            numbers[f"artifact_{k}"] = art[k]
        key = next(iter(ref_metric))
        numbers["metric_drop"] = float(ref_metric[key] - art[key])
    if target.validation.enabled:
        val.check(numbers, plan.task, plan.output_kind, prec, target.validation, f"{fmt}-{prec} artifact")
    if target.dynamic_hw:
        numbers["dynamic_hw_check"] = _check_dynamic_hw(backend, plan, data, f"{fmt}-{prec}")
    numbers["n_inputs"] = n
    numbers["reference"] = "torch (the exported nn.Module, fp32 on CPU)"
    numbers["backend"] = backend.name
    if fmt == "onnx":
        batches = [{m: np.ascontiguousarray(data.val[m][i:i + step]) for m in plan.modalities}
                   for i in range(0, n, step)]
        runtimes = _other_onnx_runtimes(stage / files[0], backend.name, plan, target, prec, hints, batches,
                                        ref)
        numbers["runtimes"] = runtimes
        numbers["verified_runtimes"] = [backend.name, *(k for k, v in runtimes.items() if v.get("verified"))]
    return numbers


def _check_dynamic_hw(backend: Any, plan: ExportPlan, data: ExportData, what: str) -> dict[str, Any]:
    """Run the staged graph once at a size 64 px larger on each axis than the export size: an artifact that
    declares dynamic H/W must take it (a ViT's positional table traced as a constant does not, and a bench
    or device would find out only at that size). Raises ExportError naming the cause."""
    x = {m: np.ascontiguousarray(np.random.default_rng(0).random(
        (1, 1, v.shape[2] + 64, v.shape[3] + 64), dtype=np.float32)) for m, v in data.val.items()}
    h, w = next(iter(x.values())).shape[2:]
    h0, w0 = next(iter(data.val.values())).shape[2:]
    try:
        out = backend.run(x)[backend.output_names[0]]
    except Exception as exc:  # noqa: BLE001 - any runtime failure here is the same finding
        raise ExportError(f"{what} artifact: dynamic_hw was asked for, but the graph runs only at its export size "
                          f"{h0}x{w0}, not at {h}x{w} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          "a fixed-size part (e.g. a ViT's positional table) was traced as a constant: export "
                          "without dynamic_hw, once per size with --input-size") from None
    spatial = tuple(out.shape[1:3] if plan.output_kind == "mask" else out.shape[2:4])
    if plan.task == "segmentation" and spatial != (h, w):
        raise ExportError(f"{what} artifact: dynamic_hw was asked for, but at {h}x{w} input the graph returns "
                          f"{spatial[0]}x{spatial[1]}: it is fixed to its export size {h0}x{w0}")
    return {"size": [int(h), int(w)], "output_shape": [int(d) for d in out.shape]}


def _other_onnx_runtimes(path: Path, done: str, plan: ExportPlan, target: ExportTarget, prec: str,
                         hints: dict, batches: list[dict[str, np.ndarray]],
                         ref: np.ndarray) -> dict[str, dict[str, Any]]:
    """Run an ONNX artifact in the other runtimes (OpenVINO in process, OpenCV DNN in a child process)
    and compare with torch. A runtime in `validation.onnx_runtimes` that fails raises ValidationError;
    one whose package is not installed is recorded as skipped."""
    from mirage_edge._deps import has
    from mirage_edge.runtime.backends import open_backend

    cfg = target.validation
    out: dict[str, dict[str, Any]] = {}
    for rt, pkg in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("opencv", "cv2")):
        if rt == done:
            continue
        if not has(pkg):
            out[rt] = {"verified": False, "skipped": f"{pkg} not installed"}
            continue
        try:
            if rt == "opencv":
                got = val.run_opencv(path, batches)
            else:
                b = open_backend(path, "onnx", rt, runtime_hints=hints)
                got = np.concatenate([b.run(f)[b.output_names[0]] for f in batches])
            nums: dict[str, Any] = val.parity_numbers(plan.task, plan.output_kind, ref,
                                                      got.astype(ref.dtype, copy=False), len(plan.classes))
            if cfg.enabled:
                val.check(nums, plan.task, plan.output_kind, prec, cfg, f"onnx-{prec} artifact in {rt}")
            out[rt] = {"verified": True, **nums}
        except Exception as exc:  # noqa: BLE001 - recorded; raised below for the required runtimes
            out[rt] = {"verified": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if cfg.enabled and rt in cfg.onnx_runtimes:
                raise ValidationError(f"onnx-{prec} artifact fails in {rt} (required by "
                                      f"validation.onnx_runtimes): {out[rt]['error']}", out[rt]) from exc
    return out


def _versions() -> dict[str, str]:
    out = {}
    for pkg in _VERSION_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _meta(plan: ExportPlan, target: ExportTarget, fmt: str, prec: str, files: list[str],
          specs: dict[str, PreprocessSpec], qinfo: QuantizationInfo | None, build: dict, hints: dict,
          numbers: dict, data: ExportData, source: SourceInfo | None, name: str) -> ArtifactMeta:
    axes = onnx_x.dynamic_axes(plan, target)
    inputs = []
    for m in plan.modalities:
        a = axes.get(m, {})
        shape: list[Any] = [a.get(0, target.batch.opt), 1, *plan.input_sizes[m]]
        for ax, sym in a.items():
            shape[ax] = sym
        inputs.append(TensorSpec(name=m, shape=shape, dtype="float32", kind="image",
                                 dynamic_axes={str(k): v for k, v in a.items()},
                                 batch_range=[target.batch.min, target.batch.max] if target.batch.dynamic
                                 else [target.batch.opt, target.batch.opt]))
    out_name = onnx_x.io_names(plan)[1][0]
    oa = axes.get(out_name, {})
    oshape: list[Any] = list(plan.output_shape)
    oshape[0] = target.batch.opt
    for ax, sym in oa.items():
        oshape[ax] = sym
    outputs = [TensorSpec(name=out_name, shape=oshape, dtype=plan.output_dtype,
                          kind=plan.output_kind, dynamic_axes={str(k): v for k, v in oa.items()})]
    build = {k: v for k, v in build.items() if v not in (None, [], "")}
    return ArtifactMeta(
        task=plan.task, format=fmt, precision=prec, files=files, inputs=inputs, outputs=outputs,  # type: ignore[arg-type]
        name=name or target.name, classes=list(plan.classes), modalities=list(plan.modalities),
        preprocessing={m: specs[m].to_dict() for m in plan.modalities}, quantization=qinfo,
        source=source or _default_source(plan.wrapper.model), parity=numbers,
        runtime=hints, build=build, export_target=target.to_dict(), versions=_versions(),
        mirage_edge_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    )


def _default_source(model: Any) -> SourceInfo:
    """What the model says about itself (registry name, checkpoint path set by load_model)."""
    spec = getattr(model, "mirage_edge_spec", None) or getattr(getattr(model, "encoder", None), "mirage_edge_spec", None)
    name = spec.get("name") if isinstance(spec, dict) else None
    src = getattr(model, "mirage_edge_source", None)
    path = src.get("path", "") if isinstance(src, dict) else ""
    loaded = getattr(model, "mirage_edge_weights", None)  # set when official/checkpoint weights were resolved
    sha = loaded.get("file_sha256", "") if isinstance(loaded, dict) else ""
    return SourceInfo(model_name=str(name or type(model).__name__), checkpoint=str(path), checkpoint_sha256=str(sha))


def _embed(fmt: str, stage: Path, files: list[str], meta: ArtifactMeta, work: Path) -> None:
    """Embed the metadata JSON in the model file (ONNX metadata_props / OpenVINO rt_info)."""
    text = meta.to_json()
    if fmt == "onnx":
        onnx_x.embed_metadata(stage / "model.onnx", text)
    elif fmt == "openvino":
        ov = require("openvino", "OpenVINO export")
        from mirage_edge.export import openvino as ov_x

        xml = stage / "model.xml"
        model = ov.Core().read_model(str(xml))
        tmp = work / "embed.xml"
        ov_x.save(model, tmp, text, compress_to_fp16=False)
        del model
        shutil.move(str(tmp), str(xml))
        shutil.move(str(tmp.with_suffix(".bin")), str(xml.with_suffix(".bin")))
