"""Masked multimodal autoencoding (MIRAGE pretraining, ARCHITECTURE.md §7-§9) on top of the engine.

Any non-empty subset of bscan / slo / bscanlayermap: the model is built (or loaded) with exactly
those input adapters and decoders; per sample `num_encoded_tokens` visible tokens are split over
the modalities by a Dirichlet(alpha) draw; each decoder's loss counts masked tokens only (MSE for
images, cross-entropy for the layer map) and the total is their (weighted) sum.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mirage_edge import config as C
from mirage_edge.errors import ConfigError, DataError
from mirage_edge.train.config import ModelSpec, PretrainConfig


class MaskedAutoencoder(nn.Module):
    """Training wrapper: forward(inputs modality -> tensor) -> (loss, {modality: loss}).

    Exists so DDP wraps a module whose `forward` is the whole masked step (DDP only syncs
    gradients through `forward`); checkpoints save `self.mirage`.
    """

    def __init__(self, mirage: nn.Module, num_encoded_tokens: int | None, alpha: float,
                 loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.mirage = mirage
        self.num_encoded_tokens = num_encoded_tokens
        self.alpha = alpha
        self.loss_weights = dict(loss_weights or {})

    def forward(self, inputs: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        from mirage_edge.models.losses import masked_loss

        preds, masks = self.mirage.forward_masked(inputs, num_encoded_tokens=self.num_encoded_tokens,
                                                  alphas=self.alpha, generator=generator)
        # The loss in fp32: masked means over few pixels lose precision in bf16.
        preds = {m: p.float() for m, p in preds.items()}
        _, parts = masked_loss(preds, inputs, masks, self.mirage.cfg)
        total = sum(self.loss_weights.get(m, 1.0) * v for m, v in parts.items())
        return total, parts


def build_pretrain_model(spec: ModelSpec, modalities: list[str]) -> nn.Module:
    """MIRAGE with input adapters and decoders for `modalities` (from scratch or from weights)."""
    from mirage_edge.models import create_model

    overrides: dict[str, Any] = {"in_domains": list(modalities), "out_domains": list(modalities)}
    overrides.update(spec.overrides)
    kwargs: dict[str, Any] = {}
    name = spec.name or "mirage"
    if spec.checkpoint:
        from mirage_edge.train.finetune import resolve_checkpoint

        kwargs["checkpoint"] = resolve_checkpoint(spec.checkpoint)
        if name.startswith("mirage-"):
            name = "mirage"
        if spec.config:
            kwargs["config"] = spec.config
    elif spec.pretrained:
        kwargs["pretrained"] = True
    model = create_model(name, **kwargs, **overrides)
    if getattr(model, "output_adapters", None) is None:
        raise ConfigError(f"model {spec.name!r} has no decoders; pretraining needs out_domains")
    return model


def _batch_inputs(batch: Mapping[str, Any], modalities: list[str]) -> dict[str, torch.Tensor]:
    return {m: batch[m] for m in modalities}


def run_pretrain(cfg: PretrainConfig, resume: str | None = None):
    """Pretrain per `cfg`; returns the engine's FitResult. Best/last checkpoints load with create_model."""
    from mirage_edge.data import MultimodalFolder, PreprocessSpec
    from mirage_edge.data.layout import scan_dataset
    from mirage_edge.train import distributed as D
    from mirage_edge.train.engine import Trainer, shard_indices, steps_per_epoch
    from mirage_edge.train.optim import CosineSchedule, build_adamw

    if not cfg.data.dir:
        raise ConfigError("'data.dir' is not set: give a multimodal folder (--data DIR or data.dir=...)")
    root = Path(cfg.data.dir)
    if not root.is_dir():
        raise ConfigError(f"'data.dir' {root} does not exist or is not a folder")
    index = scan_dataset(root, "auto")
    if index.task not in ("multimodal", "segmentation"):
        raise ConfigError(f"'data.dir' {root} is a {index.task} set; pretraining needs a multimodal folder "
                          "(bscan/ + slo/ and/or bscanlayermap/)")
    missing = [m for m in cfg.data.modalities if m not in index.modalities]
    if missing:
        raise ConfigError(f"'data.modalities' asks for {missing}, but {root} only has {list(index.modalities)}")

    info = D.env_dist_info()
    torch.manual_seed(cfg.loop.seed + info.rank)  # model init is identical: DDP broadcasts rank 0's weights
    mods = list(cfg.data.modalities)
    model = build_pretrain_model(cfg.model, mods)
    mcfg = model.cfg
    img_mod = next((m for m in mods if m != "bscanlayermap"), None)
    size = tuple(mcfg.input_size[img_mod or "bscan"]) if (img_mod or "bscan") in mcfg.input_size else (512, 512)
    lm_size = tuple(mcfg.input_size["bscanlayermap"]) if "bscanlayermap" in mcfg.input_size else None
    spec = PreprocessSpec(size=size, scaling="divide")
    splits = set(index.splits)
    train_split = "train" if "train" in splits else None
    train_set = MultimodalFolder(root, split=train_split, spec=spec, augment=cfg.data.augment,
                                 modalities=mods, layermap_size=lm_size)
    val_set = (MultimodalFolder(root, split="val", spec=spec, augment=False, modalities=mods,
                                layermap_size=lm_size) if "val" in splits else None)
    if len(train_set) == 0:
        raise DataError(f"{root}: no training samples")

    k = cfg.masking.num_encoded_tokens or None
    n_tokens = sum(mcfg.grid(m)[0] * mcfg.grid(m)[1] for m in mods)
    if k is not None and not 0 < k < n_tokens:
        raise ConfigError(f"'masking.num_encoded_tokens' = {k}: the model has {n_tokens} tokens over {mods}; "
                          f"choose 1..{n_tokens - 1} (0 = MIRAGE's ratio, {max(1, round(n_tokens * 98 / 768))})")
    unknown = [m for m in cfg.masking.loss_weights if m not in mods]
    if unknown:
        raise ConfigError(f"'masking.loss_weights' names {unknown}, not among data.modalities {mods}")
    wrapper = MaskedAutoencoder(model, k, cfg.masking.alpha, cfg.masking.loss_weights)
    opt = build_adamw(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps,
                      layer_decay=cfg.optim.layer_decay)
    spe = steps_per_epoch(len(train_set), cfg.loop, info.world_size)
    total = spe * cfg.loop.epochs if not cfg.loop.max_steps else min(spe * cfg.loop.epochs, cfg.loop.max_steps)
    warm = cfg.optim.warmup_steps or int(round(cfg.optim.warmup_epochs * spe))
    schedule = CosineSchedule(cfg.optim.lr, total, warm, cfg.optim.min_lr)

    def loss_fn(module: nn.Module, batch: dict[str, Any]):
        return module(_batch_inputs(batch, mods))

    evaluate = None
    if val_set is not None and len(val_set):
        def evaluate(m: nn.Module) -> dict[str, float]:
            # fixed masks (seeded generator) so validation losses are comparable across epochs
            gen = torch.Generator().manual_seed(cfg.loop.seed + 12345)
            ev = MaskedAutoencoder(m, k, cfg.masking.alpha, cfg.masking.loss_weights)
            sums: dict[str, float] = {}
            idx = shard_indices(len(val_set))
            dev = next(m.parameters()).device
            bs = max(1, cfg.loop.micro_batch(info.world_size))
            for s in range(0, len(idx), bs):
                items = [val_set[i] for i in idx[s:s + bs]]
                inputs = {mm: torch.stack([it[mm] for it in items]).to(dev) for mm in mods}
                loss, parts = ev(inputs, generator=gen)
                n = len(items)
                sums["val_loss"] = sums.get("val_loss", 0.0) + float(loss) * n
                for mm, v in parts.items():
                    sums[f"val_{mm}"] = sums.get(f"val_{mm}", 0.0) + float(v) * n
                sums["n"] = sums.get("n", 0.0) + n
            sums = D.all_reduce_sum({key: sums.get(key, 0.0) for key in
                                     ["n", "val_loss", *[f"val_{mm}" for mm in mods]]}, dev)
            n = max(sums.pop("n"), 1.0)
            return {key: v / n for key, v in sums.items()}

    trainer = Trainer(
        model, loss_fn, train_set, loop=cfg.loop, optimizer=opt, schedule=schedule, run_dir=cfg.out_dir,
        evaluate=evaluate, monitor="val_loss" if evaluate else None, mode="min", config=C.to_dict(cfg),
        train_module=wrapper, find_unused_parameters=False, description="pretrain",
        save_model_fn=_save_fn({"trained_by": "mirage-edge train pretrain", "modalities": mods,
                                "preprocessing": spec.to_dict()}),
    )
    result = trainer.fit(resume=resume)
    D.shutdown_distributed()
    return result


def _save_fn(meta: dict[str, Any]):
    def save(model: nn.Module, out_dir: Path) -> None:
        from mirage_edge.models import save_model

        save_model(model, out_dir, extra=meta)

    return save


__all__ = ["MaskedAutoencoder", "build_pretrain_model", "run_pretrain"]
