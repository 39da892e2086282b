"""Train configs (torch-free dataclasses): loaded with `mirage_edge.config.load` from TOML + overrides.

Example files live in `train/configs/*.toml`; every key below can be set there or on the command
line as `section.key=value` (strict: unknown keys and wrong types fail naming the key and file).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mirage_edge.errors import ConfigError


@dataclass
class ModelSpec:
    """Which network to start from.

    `name`: a registry name ("mirage-tiny", "mirage-base", "mirage-large") to build from scratch (or
    with `pretrained=true`, the official weights resolved by the models package: path, hf:, cache),
    or "mirage" with `checkpoint` (our folder or run folder, an official .pth / HF snapshot). `config`: JSON architecture
    file for official checkpoints that need one. `overrides`: keyword overrides for `create_model`
    (e.g. input sizes).
    """

    name: str = "mirage-tiny"
    pretrained: bool = False
    checkpoint: str = ""
    config: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW + per-step cosine schedule. `lr` is the peak LR (not rescaled by batch size).

    Warm-up is `warmup_steps` if > 0, else `warmup_epochs` x steps per epoch.
    `layer_decay` < 1 enables layer-wise LR decay (ARCHITECTURE.md §11 rule).
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class LoopConfig:
    """The generic training loop (shared with distillation).

    `batch_size` is the GLOBAL batch per optimizer step; each of the N processes runs micro-batches of
    batch_size / (N * grad_accum) samples, so a config gives the same optimisation on 1 or N processes.
    `device`: cpu | cuda | cuda:N | mps | auto (auto = CUDA only when present). Nothing defaults to CUDA.
    `checkpoint_every`: steps between full checkpoints (mid-epoch allowed); 0 = at every epoch end.
    The last step always gets one. `eval_every`: epochs between validations (best/ + early stopping).
    `patience`: evaluations without improvement > `min_delta` before stopping (0 = off).
    `patience_start_epoch`: an evaluation counts towards `patience` only once more than this many
    epochs are done (the official MIRAGE rule: counting starts at epoch 20, 0-based; 0 = from the start).
    Improvements are always recorded (best/ is kept from the first evaluation on).
    `threads`: torch CPU threads (0 = torch default).
    """

    device: str = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    epochs: int = 10
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    clip_grad: float = 0.0
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    patience: int = 0
    patience_start_epoch: int = 0
    min_delta: float = 0.001
    tensorboard: bool = False
    progress: bool = True
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"loop.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "keep_checkpoints", "patience", "patience_start_epoch",
                     "num_workers", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"loop.{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_grad < 0:
            raise ValueError(f"loop.clip_grad must be >= 0 (0 = off), got {self.clip_grad}")

    def micro_batch(self, world_size: int) -> int:
        per = self.batch_size // (world_size * self.grad_accum)
        if per < 1 or per * world_size * self.grad_accum != self.batch_size:
            raise ConfigError(
                f"'loop.batch_size' {self.batch_size} is not divisible by processes ({world_size}) x "
                f"'loop.grad_accum' ({self.grad_accum})")
        return per


MODALITIES = ("bscan", "slo", "bscanlayermap")


@dataclass
class PretrainDataConfig:
    """A multimodal folder (see mirage_edge.data: MultimodalFolder) and which modalities to use."""

    dir: str = ""
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    augment: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"data.modalities must be a non-empty subset of {list(MODALITIES)}, got {self.modalities}")


@dataclass
class MaskingConfig:
    """§7 token sampling: `num_encoded_tokens` visible tokens per sample, split over the modalities by
    a Dirichlet(alpha) draw; losses on masked tokens only, weighted per modality (default 1).
    `num_encoded_tokens = 0` keeps MIRAGE's ratio (98 of 768) of the tokens available."""

    num_encoded_tokens: int = 0
    alpha: float = 1.0
    loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    model: ModelSpec = field(default_factory=lambda: ModelSpec(name="mirage-base"))
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(betas=(0.9, 0.95), weight_decay=0.05))


@dataclass
class FinetuneConfig:
    """Classification (`task="cls"`) or segmentation (`task="seg"`) on a RetinaBench-style folder.

    `mode`: cls -> "linear_probe" (head only) or "full"; seg -> "frozen" (encoder blocks frozen, patch
    projection + global token + head train, as §11) or "full". `pool` (cls): global | cls | token_mix.
    `monitor`: validation metric for best checkpoint / early stopping ("" = bacc for cls, dice for seg).
    `image_size`: the model input, an int (square) or [H, W].
    `augmentation`: AugmentConfig fields (mirage_edge.data.transforms) replacing its defaults when `augment`
    is on, e.g. {speckle = 0.5, degrees = 5}. `class_weights` (seg): per-class cross-entropy weights, one
    per class of INFO.json ([] = unweighted); for a lesion class on ~0.5 % of the pixels.
    `calibrate` (seg): fold a foreground logit offset chosen on the val split into the best checkpoint's
    head, saved as calibrated/ (`mirage_edge.models.calibrate`): the threshold of a lesion of ~0.5 % of the pixels.
    `center_inputs`: train the MIRAGE patch projection on pixels minus their training-set mean (see
    `mirage_edge.train.reparam`); saved weights still take the usual [0, 1] input. For encoders trained
    from scratch: without it a tiny MIRAGE stays at chance on synthetic cls data for many epochs.
    """

    task: Literal["cls", "seg"] = "cls"
    data: str = ""
    out_dir: str = "runs/finetune"
    model: ModelSpec = field(default_factory=ModelSpec)
    image_size: int | list[int] = 512
    mode: Literal["linear_probe", "full", "frozen"] = "linear_probe"
    pool: Literal["global", "cls", "token_mix"] = "global"
    head: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    augmentation: dict[str, Any] = field(default_factory=dict)
    class_weights: list[float] = field(default_factory=list)
    center_inputs: bool = False
    calibrate: bool = False
    label_smoothing: float = 0.1
    ce_weight: float = 0.5
    dice_weight: float = 0.5
    monitor: str = ""
    test: bool = True
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.task == "cls" and self.mode == "frozen":
            raise ValueError("mode 'frozen' is for task 'seg'; use 'linear_probe' or 'full' for cls")
        if self.task == "seg" and self.mode == "linear_probe":
            raise ValueError("mode 'linear_probe' is for task 'cls'; use 'frozen' or 'full' for seg")
        if self.calibrate and self.task != "seg":
            raise ValueError("'calibrate' chooses a segmentation logit offset; it is for task 'seg'")
        try:
            h, w = self.hw
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or [H, W], got {self.image_size!r}") from None
        if min(h, w) < 8:
            raise ValueError(f"image_size must be >= 8 on each side, got {self.image_size}")

    @property
    def hw(self) -> tuple[int, int]:
        """The model input as (H, W): `image_size` = 256 is 256 x 256; [256, 384] keeps a 496 x 768
        B-scan's aspect (both axes shrunk alike, so a thin fluid pocket is not squeezed sideways)."""
        from mirage_edge.models.config import as_pair

        return as_pair(self.image_size)


def finetune_base(task: str | None) -> dict[str, Any]:
    """Defaults under a fine-tuning config file, by task: segmentation follows the official recipe
    (encoder frozen, 1024 px, §11); classification takes the dataclass defaults. One place for
    `mirage-edge train finetune` and `mirage-edge cv`."""
    return {"mode": "frozen", "image_size": 1024} if task == "seg" else {}


__all__ = ["ModelSpec", "OptimConfig", "LoopConfig", "PretrainDataConfig", "MaskingConfig",
           "PretrainConfig", "FinetuneConfig", "MODALITIES", "finetune_base"]
