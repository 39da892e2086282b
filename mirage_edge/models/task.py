"""Task models: an encoder + a head, with `forward(x: B x 1 x H x W float in [0, 1]) -> logits`.

Encoder protocol (MIRAGE and every student implement it; nothing else is assumed):

* ``embed_dim: int`` - token width D.
* ``num_global_tokens: int`` - G tokens appended *after* the patch tokens (0 for CNNs; a student
  with a front class token must move it to the end).
* ``token_grid(h: int, w: int) -> (gh, gw)`` - patch-token grid for an H x W input.
* ``forward_features(x: Tensor B x 1 x H x W) -> Tensor B x (gh*gw + G) x D`` - patch tokens
  row-major, then the G global tokens.
* optional ``input_size: (H, W)`` - the size the encoder is built for.

`SegmentationModel` drops the global tokens and feeds the patch grid to the head;
`ClassificationModel` gives the head the patch tokens and the global tokens separately.
"""
from __future__ import annotations

import torch
from torch import nn

from mirage_edge.errors import ConfigError, InputError
from mirage_edge.models.heads import ClsHead, ConvNeXtSegHead


def _check_image(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"task models take a B x 1 x H x W float image, got {shape}")
    if not x.is_floating_point():
        raise InputError(f"task models take float images in [0, 1], got dtype {x.dtype}")


class TaskModel(nn.Module):
    """Encoder + task head; `task` names the kind ("segmentation" / "classification") `save_model` writes."""

    task = ""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        for attr in ("embed_dim", "num_global_tokens", "token_grid", "forward_features"):
            if not hasattr(encoder, attr):
                raise ConfigError(f"encoder {type(encoder).__name__} lacks {attr!r} "
                                  "(see the protocol in mirage_edge.models.task)")
        self.encoder = encoder
        self.head = head

    @property
    def num_classes(self) -> int:
        return int(self.head.num_classes)

    @property
    def input_size(self) -> tuple[int, int] | None:
        size = getattr(self.encoder, "input_size", None)
        return tuple(size) if size is not None else None

    def task_config(self) -> dict:
        return {"task": self.task, "head": dict(self.head.config)}


class SegmentationModel(TaskModel):
    """forward(x B x 1 x H x W) -> B x K x H x W logits."""

    task = "segmentation"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        return self._logits(x, (h, w))

    def _logits(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        if getattr(self.head, "multiscale", False):  # FPN head: the encoder's stage maps, finest first
            return self.head(self.encoder.forward_intermediates(x, self.head.stages), out_size)
        gh, gw = self.encoder.token_grid(int(x.shape[-2]), int(x.shape[-1]))
        tokens = self.encoder.forward_features(x)
        if getattr(self.head, "needs_image", False):
            return self.head(tokens[:, : gh * gw], (gh, gw), out_size, image=x)
        return self.head(tokens[:, : gh * gw], (gh, gw), out_size)

    def forward_mask(self, x: torch.Tensor, stride: int = 1, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Class mask B x H x W of `dtype`. `stride` > 1 takes the argmax of logits upsampled only to
        H/stride x W/stride and repeats each label stride x stride: on a CPU the full-size float
        upsampling + argmax of K channels can cost as much as a small student's encoder. The cast
        comes before the repeat, so a uint8 mask also repeats 8x fewer bytes than int64."""
        _check_image(x)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if stride < 1 or h % stride or w % stride:
            raise InputError(f"mask stride {stride} must be >= 1 and divide the input size {h}x{w}")
        mask = self._logits(x, (h // stride, w // stride)).argmax(dim=1).to(dtype)
        if stride == 1:
            return mask
        return mask.repeat_interleave(stride, dim=1).repeat_interleave(stride, dim=2)


class ClassificationModel(TaskModel):
    """forward(x B x 1 x H x W) -> B x K logits."""

    task = "classification"

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__(encoder, head)
        if getattr(head, "pool", "global") != "global" and int(encoder.num_global_tokens) == 0:
            raise ConfigError(f"pool={head.pool!r} needs global tokens; {type(encoder).__name__} has none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x)
        tokens = self.encoder.forward_features(x)
        g = int(self.encoder.num_global_tokens)
        n = tokens.shape[1] - g
        return self.head(tokens[:, :n], tokens[:, n:])


def segmentation_model(encoder: nn.Module, num_classes: int, **head_kwargs) -> SegmentationModel:
    """Encoder + a fresh ConvNeXt head (official settings unless overridden)."""
    return SegmentationModel(encoder, ConvNeXtSegHead(int(encoder.embed_dim), num_classes, **head_kwargs))


def check_fpn_encoder(encoder: nn.Module) -> None:
    """ConfigError unless `encoder` is a CNN student with stage maps (what an FPN head is built on)."""
    from mirage_edge.errors import ConfigError

    if not getattr(encoder, "stage_info", None) or getattr(encoder, "_vit", False):
        raise ConfigError(f"an fpn head needs a CNN student with stage maps; {type(encoder).__name__} has none")


def fpn_segmentation_model(encoder: nn.Module, num_classes: int, dim: int = 64,
                           min_stride: int = 4, smooth: str = "conv") -> SegmentationModel:
    """CNN student + a fresh FPN head (heads.FPNSegHead, `smooth` "conv" | "dw") on its stages of
    stride >= `min_stride`."""
    from mirage_edge.models.heads import FPNSegHead

    check_fpn_encoder(encoder)
    info = encoder.stage_info
    # the last stage of each stride (timm lists a stride once per stage; several stages may share it)
    last = {stride: i for i, (_, stride) in enumerate(info) if stride >= min_stride}
    stages = sorted(last.values())
    return SegmentationModel(encoder, FPNSegHead([info[i][0] for i in stages], num_classes, stages, dim, smooth))


def classification_model(encoder: nn.Module, num_classes: int, pool: str = "global") -> ClassificationModel:
    return ClassificationModel(encoder, ClsHead(int(encoder.embed_dim), num_classes, pool))


TASK_CLASSES = {"segmentation": SegmentationModel, "classification": ClassificationModel}
