"""`mirage-edge export CHECKPOINT --target export/targets/NAME.toml` (or --format/--precision/--calib)."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from mirage_edge.errors import ConfigError


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def load_source_model(checkpoint: str, input_size: tuple[int, int] | None = None, *, task: str = "auto",
                      num_classes: int | None = None, head: dict | None = None, random_weights: bool = False):
    """(model, SourceInfo, classes, preprocess dict) from a checkpoint or a registered model name.

    Accepts our checkpoint folders (teacher or distilled student, `meta` in config.json), QAT
    student folders from `mirage-edge distill --qat` (qat.json: rebuilt with its NNCF quantizers,
    so the export writes their Q/DQ graph), official MIRAGE files, and registry names (official
    weights or, with `random_weights`, seeded random ones; with `task` segmentation/classification
    and `num_classes` a fresh task head, see `mirage_edge.export.registered`). `input_size` rebuilds
    the model at that size (MIRAGE positional tables are resized explicitly).
    """
    import json

    from mirage_edge._io import sha256_file
    from mirage_edge.artifact import SourceInfo
    from mirage_edge.models import is_model

    p = Path(checkpoint)
    kw = {"input_size": tuple(input_size)} if input_size else {}
    if not p.exists():
        if is_model(checkpoint):
            from mirage_edge.export.registered import registered_model

            reg = registered_model(checkpoint, task=task, num_classes=num_classes, head=head,
                                   random_weights=random_weights, input_size=input_size)
            return reg.model, reg.source, None, None
        raise ConfigError(f"checkpoint not found: {checkpoint} (and it is not a registered model name)")
    if num_classes is not None or head:
        raise ConfigError(f"--num-classes / --head build a head on a registered model name; {p} is a checkpoint "
                          "with its own head (or an encoder: fine-tune it with mirage-edge train)")
    if random_weights:
        raise ConfigError(f"--random-weights is for a registered model name; {p} is a checkpoint with its own weights")
    meta: dict = {}
    if p.is_dir() and (p / "qat.json").is_file():
        if input_size:
            raise ConfigError(f"{p} is a QAT student: its quantizers are tied to its input size; drop --input-size")
        from mirage_edge.distill.student_io import load_student

        model = load_student(p)
        meta = json.loads((p / "qat.json").read_text(encoding="utf-8")).get("meta", {}) or {}
    else:
        from mirage_edge.models import load_model

        model = load_model(p, **kw)
        cfg_path = p / "config.json"
        if p.is_dir() and cfg_path.is_file():
            meta = json.loads(cfg_path.read_text(encoding="utf-8")).get("meta", {}) or {}
    weights = p / "model.safetensors" if p.is_dir() else p
    teacher = meta.get("teacher", "")
    if isinstance(teacher, dict):
        teacher_name, teacher_sha = str(teacher.get("name", "")), str(teacher.get("weights_sha256", ""))
    else:
        teacher_name, teacher_sha = str(teacher or ""), str(meta.get("teacher_sha256", ""))
    src = SourceInfo(
        model_name=str(meta.get("model_name", type(model).__name__)), checkpoint=str(p),
        checkpoint_sha256=sha256_file(weights) if weights.is_file() else "",
        teacher=teacher_name, teacher_sha256=teacher_sha,
    )
    classes = meta.get("classes") if isinstance(meta.get("classes"), list) and meta.get("classes") else None
    preprocess = meta.get("preprocess") if isinstance(meta.get("preprocess"), dict) else None
    return model, src, classes, preprocess


def resolve_distill_run(path: Path, precisions: list[str]) -> tuple[Path, str] | None:
    """(model folder, why) when `path` is a `mirage-edge distill` output folder, else None.

    A run holds the FP32 student (student/) and, with --qat, the QAT student (student_int8/). An
    int8-only export takes the QAT student, whose trained quantizers are the INT8 model; any other
    precision needs the FP32 student (a fake-quantized model exports to int8 only).
    """
    if not (path.is_dir() and (path / "recipe.toml").is_file()):
        return None
    fp32, qat = path / "student", path / "student_int8"
    if precisions and set(precisions) == {"int8"} and (qat / "qat.json").is_file():
        return qat, "the QAT INT8 student of this distill run"
    if (fp32 / "config.json").is_file():
        why = "the FP32 student of this distill run"
        if "int8" in precisions:
            why += (" (INT8 by post-training quantization: "
                    + ("export int8 alone to use its QAT student)" if (qat / "qat.json").is_file()
                       else "the run has no QAT student)"))
        return fp32, why
    raise ConfigError(f"{path} is a distill run folder without a finished student (no student/config.json); "
                      "finish it with `mirage-edge distill ... --resume`")


@click.command("export")
@click.argument("checkpoint")
@click.option("--target", "target", default=None,
              help="Export target TOML (export/targets/NAME.toml) or a curated target name.")
@click.option("--format", "formats", default=None, help="Comma list: onnx,openvino,tensorrt (overrides target).")
@click.option("--precision", "precisions", default=None, help="Comma list: fp32,fp16,int8 (overrides target).")
@click.option("--calib", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Image folder for INT8 calibration + validation (default: generated images).")
@click.option("--calib-images", type=int, default=None, help="Number of calibration images.")
@click.option("--task", type=click.Choice(["auto", "encoder", "classification", "segmentation"]), default=None)
@click.option("--num-classes", type=int, default=None,
              help="Registered model name + --task segmentation/classification: classes of the fresh task head.")
@click.option("--head", "head", multiple=True, metavar="KEY=VALUE",
              help="Options of that head (default: the official ones), e.g. --head depth=2 --head class_dim=32 "
                   "(segmentation) or --head pool=cls (classification).")
@click.option("--random-weights", is_flag=True, default=False,
              help="Registered model name: export seeded random weights on purpose (timing only; the metadata "
                   "says so). Without it a name needs its official weights.")
@click.option("--input-size", type=int, nargs=2, default=None, metavar="H W",
              help="Export at this size (H and W multiples of the model's patch/stride).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any target key, e.g. --set validation.n_inputs=16 --set batch.max=4.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--name", default="", help="Artifact name stored in metadata (default: the target name).")
def export_cmd(checkpoint: str, target: str | None, formats: str | None, precisions: str | None,
               calib: Path | None, calib_images: int | None, task: str | None, num_classes: int | None,
               head: tuple[str, ...], random_weights: bool, input_size: tuple[int, int] | None,
               overrides: tuple[str, ...], out: Path, name: str) -> None:
    """Export CHECKPOINT (our checkpoint folder, a `distill` output folder, an official MIRAGE file, or a
    registered model name) to validated artifacts: OUT/<format>-<precision>/ with model file(s),
    metadata.json, SHA256SUMS.

    \b
    A registered name exports like a fine-tuned teacher with --task and --num-classes, e.g.
      mirage-edge export mirage-base --task segmentation --num-classes 9 --random-weights \\
          --target teacher-cpu-openvino-int8 --out artifacts/mirage-base
    """
    from mirage_edge.export.registered import parse_head
    from mirage_edge.export.target import load_target

    sets = list(overrides)
    if formats:
        sets.append(f"formats={_split(formats)!r}".replace("'", '"'))
    if precisions:
        sets.append(f"precisions={_split(precisions)!r}".replace("'", '"'))
    if calib_images is not None:  # 0 is refused by the target's check, not taken as "not given"
        sets.append(f"quantization.calib_images={int(calib_images)}")
    if task:
        sets.append(f'task="{task}"')
    if input_size:
        sets.append(f"input_size=[{int(input_size[0])}, {int(input_size[1])}]")
    tgt = load_target(target, sets)

    from rich.console import Console

    from mirage_edge._log import quiet
    from mirage_edge.export.api import export_model
    from mirage_edge._io import check_output_dir

    check_output_dir(out)  # a bad --out fails before the model loads, not after the export work
    console = Console(stderr=True)
    run = resolve_distill_run(Path(checkpoint), list(tgt.precisions))
    if run is not None:
        logging.getLogger(__name__).info("exporting %s: %s", run[0], run[1])
        checkpoint = str(run[0])
    build: dict | None = None
    from mirage_edge.models import is_model

    if not Path(checkpoint).exists() and is_model(checkpoint):
        from mirage_edge.export.registered import registered_model

        reg = registered_model(checkpoint, task=tgt.task, num_classes=num_classes, head=parse_head(head),
                               random_weights=random_weights, input_size=input_size)
        model, source, classes, preprocess, build = reg.model, reg.source, None, None, reg.build
    else:
        model, source, classes, preprocess = load_source_model(
            checkpoint, input_size, task=tgt.task, num_classes=num_classes, head=parse_head(head),
            random_weights=random_weights)
    with console.status("exporting...") as status:
        def log(msg: str) -> None:
            status.update(msg)
            if not quiet():
                console.log(msg)

        dirs = export_model(model, out, tgt, calib=calib, classes=classes, preprocess=preprocess, source=source,
                            name=name, log=log, build_info=build)
    for d in dirs:
        click.echo(str(d))
