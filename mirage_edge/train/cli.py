"""`mirage-edge train pretrain|finetune`: parse into the train config dataclasses, call one function.

Torch is imported inside the command bodies only (so `--help` stays torch-free). Under torchrun
(`torchrun --nproc-per-node N -m mirage_edge.cli train ...`) the same commands run DDP.

A run folder that cannot be written (a file, read-only, full disk) is refused before any work; a write
that fails later stops the run with a one-line error naming the file. A run is complete when its
metrics.jsonl ends with the 'summary' record (finetune with test=true: and test_metrics.json exists);
checkpoints are written atomically, so an incomplete run resumes with `--resume auto`.
"""
from __future__ import annotations

import click

from mirage_edge import config as C

_OVERRIDES_HELP = "Extra settings as key=value (e.g. loop.epochs=5 optim.lr=3e-4), applied last."


def _check_out(out_dir: str) -> None:
    """Refuse a run folder that cannot be written (a file, read-only, full) before any work."""
    from mirage_edge._io import check_output_dir

    check_output_dir(out_dir, "--out")


def _incomplete(out_dir: str) -> str:
    return (f"; the run in {out_dir} is incomplete (its metrics.jsonl has no 'summary' record): "
            "resume it with --resume auto once the folder can be written")


def _check_patch_multiple(model_name: str, checkpoint: str, overrides: dict, hw: tuple[int, int]) -> None:
    """A registered MIRAGE size takes only image sizes that are a multiple of its patch: refuse another
    one before the data is read. (A checkpoint's patch is known once it is read; its build checks it.)"""
    from mirage_edge.errors import ConfigError
    from mirage_edge.models.config import SIZES, size_config

    if checkpoint or model_name not in SIZES:
        return
    try:
        patch = size_config(model_name, **{k: v for k, v in overrides.items() if k != "input_size"}).patch_size
    except ConfigError:
        return  # bad model.overrides: the model build names them
    ph, pw = patch.get("bscan") or patch.get("slo") or (0, 0)
    for side, p in zip(hw, (ph, pw)):
        if p and side % p:
            lower, upper = side // p * p, (side // p + 1) * p
            hint = f"{lower} or {upper}" if lower else f"{upper}"
            what = f"{side}" if hw[0] == hw[1] else f"{hw[0]} x {hw[1]}: {side}"
            raise ConfigError(f"image_size {what} is not a multiple of the {ph}x{pw} patch of {model_name}; "
                              f"use e.g. {hint}")


def _common(f):
    f = click.option("--resume", default=None, metavar="CKPT|auto",
                     help="Resume from a checkpoint folder, or 'auto' = latest under OUT/checkpoints.")(f)
    f = click.option("--out", "out_dir", default=None, help="Run folder (metrics.jsonl, checkpoints/, best/).")(f)
    f = click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Autocast precision (default from config: fp32). bf16 needs a bf16-capable device.")(f)
    f = click.option("--device", default=None, metavar="DEV",
                     help="cpu | cuda | cuda:N | mps | auto (default from config: cpu; auto = CUDA only if present).")(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="TOML config (see train/configs/).")(f)
    return f


@click.group("train")
def train() -> None:
    """Pretrain MIRAGE (masked multimodal autoencoding) or fine-tune it for classification/segmentation.

    \b
    Examples:
      mirage-edge train pretrain --config train/configs/pretrain_tiny_cpu.toml
      mirage-edge train finetune --task seg --data data/layers --config train/configs/finetune_seg_tiny_cpu.toml
      torchrun --nproc-per-node 8 -m mirage_edge.cli train pretrain --config train/configs/pretrain_base_512.toml --device cuda --precision bf16
    """


@train.command("pretrain")
@_common
@click.option("--data", "data_dir", default=None, help="Multimodal folder (overrides data.dir).")
@click.option("--model", "model_name", default=None, help="Registry name, or 'mirage' with --checkpoint.")
@click.option("--checkpoint", default=None, help="Initialise from weights (official .pth, HF snapshot, our folder).")
@click.argument("overrides", nargs=-1)
def pretrain_cmd(config_file, device, precision, out_dir, resume, data_dir, model_name, checkpoint, overrides):
    """Masked multimodal autoencoding over any subset of bscan / slo / bscanlayermap."""
    from mirage_edge.train.config import PretrainConfig

    cfg = C.load(PretrainConfig, config_file, overrides, sets={
        "loop.device": device, "loop.precision": precision, "out_dir": out_dir, "data.dir": data_dir,
        "model.name": model_name, "model.checkpoint": checkpoint})
    from mirage_edge._io import output_errors

    _check_out(cfg.out_dir)
    from mirage_edge.train.pretrain import run_pretrain

    with output_errors(cfg.out_dir, _incomplete(cfg.out_dir)):
        run_pretrain(cfg, resume=resume)


@train.command("finetune")
@_common
@click.option("--task", type=click.Choice(["cls", "seg"]), default=None, help="Classification or segmentation.")
@click.option("--data", "data_dir", default=None, help="RetinaBench-style dataset folder.")
@click.option("--model", "model_name", default=None, help="Registry name, or 'mirage' with --checkpoint.")
@click.option("--checkpoint", default=None, help="Start from weights: our run folder/best, official .pth, HF snapshot.")
@click.option("--model-config", default=None, help="Architecture JSON for official checkpoints that need one.")
@click.option("--mode", type=click.Choice(["linear_probe", "full", "frozen"]), default=None,
              help="cls: linear_probe | full; seg: frozen (encoder blocks frozen, §11) | full.")
@click.option("--pool", type=click.Choice(["global", "cls", "token_mix"]), default=None, help="cls pooling.")
@click.argument("overrides", nargs=-1)
def finetune_cmd(config_file, device, precision, out_dir, resume, task, data_dir, model_name, checkpoint,
                 model_config, mode, pool, overrides):
    """Fine-tune a classification or segmentation model; keeps the best validation checkpoint, then tests it."""
    from mirage_edge.train.config import FinetuneConfig, finetune_base

    file_task = None
    if config_file:
        file_task = C.read_config(config_file).get("task")
    eff_task = task or file_task or "cls"
    cfg = C.load(FinetuneConfig, config_file, overrides, base=finetune_base(eff_task), sets={
        "task": task, "data": data_dir, "loop.device": device, "loop.precision": precision,
        "out_dir": out_dir, "model.name": model_name, "model.checkpoint": checkpoint,
        "model.config": model_config, "mode": mode, "pool": pool})
    from mirage_edge._io import output_errors

    _check_patch_multiple(cfg.model.name, cfg.model.checkpoint, dict(cfg.model.overrides), cfg.hw)
    _check_out(cfg.out_dir)
    from mirage_edge.train.finetune import run_finetune

    with output_errors(cfg.out_dir, _incomplete(cfg.out_dir)):
        run_finetune(cfg, resume=resume)


__all__ = ["train"]

