"""Fine-tuning for classification and segmentation (ARCHITECTURE.md §11-§12) on top of the engine.

* cls: encoder + ClsHead (LayerNorm -> pool global|cls|token_mix -> Linear); `linear_probe` trains
  the final Linear only (the official `head.` rule), `full` everything. Loss: label-smoothing CE.
* seg: encoder + ConvNeXtSegHead; `frozen` freezes the transformer blocks (patch projection, global
  token and head train, §11), `full` trains everything. Loss: 0.5 CE + 0.5 generalised Dice.
The validation metric picks `best/` and drives early stopping; the best checkpoint is then
evaluated on the test split with `mirage_edge.metrics` and the numbers written to
`<out_dir>/test_metrics.json`. seg with `calibrate`: a foreground logit offset chosen on the val split
is folded into best/'s head and saved as `<out_dir>/calibrated/` (`mirage_edge.models.calibrate`), which a
run folder then resolves to and the test split scores.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mirage_edge._log import progress
from mirage_edge import config as C
from mirage_edge._io import atomic_write_text
from mirage_edge.errors import ConfigError, DataError
from mirage_edge.train.config import FinetuneConfig, ModelSpec

TASK_NAMES = {"cls": "classification", "seg": "segmentation"}
DEFAULT_MONITOR = {"cls": "bacc", "seg": "dice"}


# ------------------------------------------------------------------------------------- model


def resolve_checkpoint(path: str) -> str:
    """A run folder is accepted in place of a checkpoint: its calibrated/, else best/, else its latest
    checkpoints/step_*."""
    from mirage_edge.train.checkpoint import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"'model.checkpoint' {p} does not exist")
    if p.is_dir() and not (p / "config.json").exists():
        for sub in ("calibrated", "best"):
            if (p / sub / "config.json").exists():
                return str(p / sub)
        last = latest_checkpoint(p / "checkpoints")
        if last is not None:
            return str(last)
    return str(p)


def as_bscan_encoder(encoder: nn.Module, image_size: int | tuple[int, int]) -> nn.Module:
    """MIRAGE -> B-scan-only encoder without decoders at `image_size` (H, W) (§11-§12: every fine-tuning
    image goes through the bscan adapter). Other encoders are returned as they are."""
    from mirage_edge.models.config import as_pair
    from mirage_edge.models.mirage import MIRAGE

    if not isinstance(encoder, MIRAGE):
        return encoder
    if "bscan" not in encoder.input_adapters:
        raise ConfigError("the checkpoint's MIRAGE has no bscan input adapter; fine-tuning needs one")
    cfg = encoder.cfg
    if encoder.output_adapters is not None or list(cfg.in_domains) != ["bscan"]:
        encoder.output_adapters = None
        for m in list(encoder.input_adapters):
            if m != "bscan":
                del encoder.input_adapters[m]
        encoder.cfg = dataclasses.replace(cfg, in_domains=["bscan"], out_domains=[], grid_size=None)
    hw = as_pair(image_size)
    if tuple(encoder.input_size) != hw:
        encoder.set_input_size(hw)
    return encoder


def build_task_model(spec: ModelSpec, task: str, num_classes: int, image_size: tuple[int, int], pool: str,
                     head: dict[str, Any]) -> nn.Module:
    """Encoder (registry name, official weights or our folder) + a fresh head; a saved task model of the
    same task and class count is continued as it is."""
    from mirage_edge.models import create_model
    from mirage_edge.models.task import ClassificationModel, SegmentationModel, classification_model, segmentation_model

    kwargs: dict[str, Any] = dict(spec.overrides)
    name = spec.name or "mirage"
    if spec.checkpoint:
        kwargs["checkpoint"] = resolve_checkpoint(spec.checkpoint)
        if spec.config:
            if not Path(spec.config).is_file():
                raise ConfigError(f"'model.config' {spec.config} does not exist")
            kwargs["config"] = spec.config
        if name.startswith("mirage-"):
            name = "mirage"
    if spec.pretrained and not spec.checkpoint:
        kwargs["pretrained"] = True
    model = create_model(name, **kwargs)
    want = SegmentationModel if task == "seg" else ClassificationModel
    if isinstance(model, (SegmentationModel, ClassificationModel)):
        if isinstance(model, want) and model.num_classes == num_classes:
            as_bscan_encoder(model.encoder, image_size)
            return model
        model = model.encoder  # another task or class count: keep the encoder, new head
    encoder = as_bscan_encoder(model, image_size)
    if task == "seg":
        return segmentation_model(encoder, num_classes, **head)
    if head:
        raise ConfigError(f"'head' options {sorted(head)} are for segmentation; cls takes 'pool' only")
    return classification_model(encoder, num_classes, pool=pool)


def set_trainable(model: nn.Module, task: str, mode: str) -> None:
    """Freeze per mode (see module docstring)."""
    from mirage_edge.models.mirage import MIRAGE

    for p in model.parameters():
        p.requires_grad_(mode == "full")
    if mode == "full":
        return
    if mode == "linear_probe":
        for p in model.head.fc.parameters():
            p.requires_grad_(True)
        return
    # seg "frozen": transformer blocks frozen; adapters, global token and head train (§11)
    for p in model.head.parameters():
        p.requires_grad_(True)
    enc = model.encoder
    if isinstance(enc, MIRAGE):
        for n, p in enc.named_parameters():
            if not n.startswith("encoder."):
                p.requires_grad_(True)


# ------------------------------------------------------------------------------------- data


def check_data(cfg: FinetuneConfig) -> Any:
    """Fail early, naming the path, when the folder is missing or holds another task."""
    from mirage_edge.data.layout import scan_dataset

    if not cfg.data:
        raise ConfigError("'data' is not set: give the dataset folder (--data DIR)")
    root = Path(cfg.data)
    if not root.is_dir():
        raise ConfigError(f"'data' {root} does not exist or is not a folder")
    index = scan_dataset(root, "auto")
    want = TASK_NAMES[cfg.task]
    if index.task != want and not (cfg.task == "seg" and index.task == "multimodal" and index.info is not None):
        raise ConfigError(f"task {cfg.task!r} needs a {want} folder, but 'data' {root} is a {index.task} set")
    for split in ("train", "val"):
        if split not in index.splits or not index.splits[split]:
            raise DataError(f"{root} has no '{split}' split ({root / split}); fine-tuning needs train and val")
    return index


def _spec(cfg: FinetuneConfig):
    from mirage_edge.data import PreprocessSpec

    # §10/§12: per-image min-max; segmentation before resizing, classification after
    order = "before_resize" if cfg.task == "seg" else "after_resize"
    return PreprocessSpec(size=cfg.hw, scaling="minmax", minmax_order=order)


def pixel_mean(dataset: Any, max_images: int = 256) -> float:
    """Mean pixel of up to `max_images` evenly spaced images of `dataset` (items with an "image"
    tensor): the centre for `center_inputs`, taken on the preprocessed, non-augmented training split."""
    n = len(dataset)
    if n == 0:
        raise DataError("cannot take the pixel mean of an empty split")
    idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
    return float(np.mean([float(dataset[int(i)]["image"].double().mean()) for i in idx]))


def _datasets(cfg: FinetuneConfig, spec) -> dict[str, Any]:
    from mirage_edge.data import ClassificationFolder, SegmentationFolder

    cls = SegmentationFolder if cfg.task == "seg" else ClassificationFolder
    root = Path(cfg.data)
    augment: Any = cfg.augment
    if cfg.augment and cfg.augmentation:
        from mirage_edge.data.transforms import Augment, AugmentConfig

        try:
            aug_cfg = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.augmentation.items()})
        except TypeError as exc:
            raise ConfigError(f"'augmentation' {cfg.augmentation}: {exc} (fields: see AugmentConfig)") from None
        augment = Augment(aug_cfg)
    out = {"train": cls(root, split="train", spec=spec, augment=augment),
           "val": cls(root, split="val", spec=spec, augment=False)}
    if cfg.test and (root / "test").is_dir():
        out["test"] = cls(root, split="test", spec=spec, augment=False)
    return out


# ------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, dataset: Any, batch_size: int, num_workers: int = 0) -> dict[int, np.ndarray]:
    """This rank's share of `dataset` -> {index: probs (K,) for cls | argmax mask H x W (uint8/int16) for seg},
    gathered from every rank."""
    from torch.utils.data import DataLoader, Subset

    from mirage_edge.train import distributed as D
    from mirage_edge.train.engine import shard_indices

    dev = next(model.parameters()).device
    idx = shard_indices(len(dataset))
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())
    out: dict[int, np.ndarray] = {}
    for batch in loader:
        logits = model(batch["image"].to(dev)).float()
        if logits.dim() == 2:
            vals = logits.softmax(dim=1).cpu().numpy()
        else:
            vals = logits.argmax(dim=1).to(torch.int16).cpu().numpy()
        for i, v in zip(batch["index"].tolist(), vals):
            out[int(i)] = v
    merged: dict[int, np.ndarray] = {}
    for part in D.all_gather_objects(out):
        merged.update(part)
    return merged


def evaluate_cls(model: nn.Module, dataset: Any, batch_size: int, num_workers: int = 0) -> dict[str, float]:
    """Classification metrics (mirage_edge.metrics) + plain CE loss on `dataset`."""
    from mirage_edge.metrics import classification_metrics

    preds = predict(model, dataset, batch_size, num_workers)
    order = sorted(preds)
    probs = np.stack([preds[i] for i in order]).astype(np.float64)
    y = np.asarray([dataset.targets[i] for i in order])
    metrics = dict(classification_metrics(y, probs))
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    metrics["loss"] = float(-np.log(p).mean())
    return _flat(metrics)


def evaluate_seg(model: nn.Module, dataset: Any, batch_size: int, num_workers: int = 0,
                 hd95: bool = True) -> dict[str, float]:
    """Per-volume segmentation metrics (mirage_edge.metrics) on `dataset`: background-like and
    invalid classes are not scored, predictions are compared at each ground truth's own size (§13).
    Returns dice / iou / hd95 means plus `dice/<class>` per scored class."""
    from mirage_edge.metrics import segmentation_metrics

    preds = predict(model, dataset, batch_size, num_workers)
    order = sorted(preds)
    res = seg_scores([preds[i] for i in order], dataset, order, hd95)
    out = _flat(res)
    if not hd95:
        out.pop("hd95", None)
    for name, row in res.get("per_class", {}).items():
        out[f"dice/{name}"] = float(row["dice"])
    return out


def seg_scores(pred_masks: list[np.ndarray], dataset: Any, order: list[int], hd95: bool = True,
               true_masks: list[np.ndarray] | None = None) -> dict[str, Any]:
    """`segmentation_metrics` of `pred_masks` (H x W each, dataset items `order`) against the dataset's masks
    (`true_masks`: those masks already read, for a caller that scores many predictions)."""
    from mirage_edge.metrics import segmentation_metrics

    if true_masks is None:
        true_masks = [dataset.read_mask(i) for i in order]
    return segmentation_metrics(pred_masks, true_masks,
                                [dataset.volume_ids[i] for i in order], list(dataset.classes), ignore=None,
                                invalid=dataset.info.indices("invalid"), compute_hd95=hd95)


@torch.no_grad()
def calibrate_seg(model: nn.Module, dataset: Any, batch_size: int) -> dict[str, Any]:
    """Choose the foreground logit offset on `dataset` (val) by its Dice and fold it into `model`'s head.
    Every rank computes the same logits over the whole split, so every rank folds the same offset."""
    from torch.utils.data import DataLoader

    from mirage_edge.models import calibrate
    from mirage_edge.metrics import scored_classes

    dev = next(model.parameters()).device
    model.eval()
    logits = np.concatenate([model(b["image"].to(dev)).float().cpu().numpy()
                             for b in DataLoader(dataset, batch_size=batch_size, shuffle=False)])
    order = list(range(len(dataset)))
    invalid = set(dataset.info.indices("invalid"))
    fg = [c for c in scored_classes(list(dataset.classes), None) if c not in invalid]
    truth = [dataset.read_mask(i) for i in order]  # once, not once per offset tried
    res = calibrate.choose_offset(logits, fg, lambda lg: seg_scores(list(lg.argmax(1)), dataset, order, False,
                                                                    truth)["dice"])
    calibrate.fold_offset(model, res["classes"], res["offset"])
    return res


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    """Keep scalar numbers (nested per-class tables go to the JSON report, not the monitor)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, np.bool_)):
            continue
        if isinstance(v, (int, float, np.integer, np.floating)):
            out[k] = float(v)
    return out


# -------------------------------------------------------------------------------------- run


def run_finetune(cfg: FinetuneConfig, resume: str | None = None) -> dict[str, Any]:
    """Fine-tune per `cfg`; returns {"fit": FitResult, "val": best val metrics, "test": test metrics}."""
    from mirage_edge.train import distributed as D
    from mirage_edge.train.checkpoint import load_checkpoint
    from mirage_edge.train.engine import Trainer, steps_per_epoch
    from mirage_edge.train.losses import ce_gdice_loss
    from mirage_edge.train.optim import CosineSchedule, build_adamw

    check_data(cfg)
    info = D.env_dist_info()
    spec = _spec(cfg)
    sets = _datasets(cfg, spec)
    train_set = sets["train"]
    if cfg.task == "cls" and train_set.num_classes < 2:
        raise DataError(f"{cfg.data}: classification needs at least 2 class folders, found {train_set.classes}")
    torch.manual_seed(cfg.loop.seed)
    model = build_task_model(cfg.model, cfg.task, train_set.num_classes, cfg.hw, cfg.pool, dict(cfg.head))
    set_trainable(model, cfg.task, cfg.mode)
    if cfg.center_inputs:
        from mirage_edge.train.reparam import center_inputs

        center = pixel_mean(type(train_set)(Path(cfg.data), split="train", spec=spec, augment=False))
        try:
            center_inputs(model, center)
        except ValueError as exc:
            raise ConfigError(f"'center_inputs': {exc}") from None
        if info.is_main:
            progress(f"center_inputs: patch projection trained on pixels - {center:.4f} (training-set mean)")
    opt = build_adamw(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps,
                      layer_decay=cfg.optim.layer_decay)
    spe = steps_per_epoch(len(train_set), cfg.loop, info.world_size)
    total = spe * cfg.loop.epochs if not cfg.loop.max_steps else min(spe * cfg.loop.epochs, cfg.loop.max_steps)
    warm = cfg.optim.warmup_steps or int(round(cfg.optim.warmup_epochs * spe))
    schedule = CosineSchedule(cfg.optim.lr, total, warm, cfg.optim.min_lr)
    eval_bs = max(1, cfg.loop.micro_batch(info.world_size))

    if cfg.task == "cls":
        def loss_fn(m: nn.Module, batch: dict[str, Any]):
            logits = m(batch["image"]).float()
            loss = F.cross_entropy(logits, batch["label"], label_smoothing=cfg.label_smoothing)
            acc = (logits.argmax(1) == batch["label"]).float().mean()
            return loss, {"acc": acc.detach()}

        def evaluate(m: nn.Module) -> dict[str, float]:
            return evaluate_cls(m, sets["val"], eval_bs, cfg.loop.num_workers)
    else:
        weights = None
        if cfg.class_weights:
            if len(cfg.class_weights) != train_set.num_classes:
                raise ConfigError(f"'class_weights' has {len(cfg.class_weights)} values but {cfg.data} has "
                                  f"{train_set.num_classes} classes {list(train_set.classes)}")
            weights = torch.tensor([float(w) for w in cfg.class_weights])

        def loss_fn(m: nn.Module, batch: dict[str, Any]):
            return ce_gdice_loss(m(batch["image"]), batch["mask"], cfg.ce_weight, cfg.dice_weight, weights)

        def evaluate(m: nn.Module) -> dict[str, float]:
            return evaluate_seg(m, sets["val"], eval_bs, cfg.loop.num_workers, hd95=False)

    monitor = cfg.monitor or DEFAULT_MONITOR[cfg.task]
    mode = "min" if monitor.endswith("loss") or monitor.startswith("hd95") else "max"
    meta = {"trained_by": "mirage-edge train finetune", "task": TASK_NAMES[cfg.task],
            "classes": list(train_set.classes), "preprocessing": spec.to_dict(), "monitor": monitor,
            "data": str(cfg.data)}

    def save_fn(m: nn.Module, out_dir: Path, more: dict[str, Any] | None = None) -> None:
        from mirage_edge.models import save_model

        save_model(m, out_dir, extra={**meta, **(more or {})})

    trainer = Trainer(model, loss_fn, train_set, loop=cfg.loop, optimizer=opt, schedule=schedule,
                      run_dir=cfg.out_dir, evaluate=evaluate, monitor=monitor, mode=mode,
                      config=C.to_dict(cfg), save_model_fn=save_fn, description=f"finetune-{cfg.task}")
    fit = trainer.fit(resume=resume)
    out: dict[str, Any] = {"fit": fit, "val": fit.history[-1] if fit.history else {}, "test": None}
    scored = fit.best_dir
    if fit.best_dir is not None:
        load_checkpoint(fit.best_dir, model)
        out["val"] = next((h for h in fit.history if h["step"] == fit.best_step), out["val"])
    if cfg.calibrate:  # from best/ every time, so a resumed finished run writes the same calibrated/
        out["calibration"] = cal = calibrate_seg(model, sets["val"], eval_bs)
        scored = Path(cfg.out_dir) / "calibrated"
        if info.is_main:
            from mirage_edge.models import calibrate

            save_fn(model, scored, {"calibration": cal, "from": str(fit.best_dir)})
            progress(f"{calibrate.describe(cal)}; saved to {scored}")
    if "test" in sets and len(sets["test"]):
        model.eval()
        with torch.no_grad(), D.autocast(trainer.device, trainer.amp_dtype):
            if cfg.task == "cls":
                test = evaluate_cls(model, sets["test"], eval_bs, cfg.loop.num_workers)
            else:
                test = evaluate_seg(model, sets["test"], eval_bs, cfg.loop.num_workers, hd95=True)
        out["test"] = test
        if info.is_main:
            atomic_write_text(Path(cfg.out_dir) / "test_metrics.json", json.dumps(
                {"checkpoint": str(scored), "best_step": fit.best_step, "val": out["val"], "test": test,
                 **({"calibration": out["calibration"]} if cfg.calibrate else {})},
                indent=1, default=float))
            shown = "  ".join(f"{k} {v:.4f}" for k, v in test.items())
            progress(f"test ({scored}): {shown}")
    D.shutdown_distributed()
    return out


__all__ = ["run_finetune", "resolve_checkpoint", "build_task_model", "set_trainable", "as_bscan_encoder", "evaluate_cls",
           "evaluate_seg", "calibrate_seg", "seg_scores", "predict", "check_data", "pixel_mean"]
