"""Task heads on encoder tokens: ConvNeXt segmentation decoder (§11) and classification head (§12).

Heads take the *patch* tokens (global tokens removed) and, for classification, the global tokens
separately; `mirage_edge.models.task` does the split. `head.config` holds the constructor kwargs
(saved in our checkpoints' config.json).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mirage_edge.errors import ConfigError


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LN over channels -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> + input."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # B x H x W x C
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtSegHead(nn.Module):
    """The official `ConvNeXtAdapter` segmentation head.

    forward(patch_tokens B x (gh*gw) x D, grid (gh, gw), image_size (H, W)) -> B x K x H x W logits.
    proj_dec maps each token to `preds_per_patch` sub-pixel vectors of `class_dim` channels
    (chunk p = s*ph + pw -> sub-pixel (ph, pw), s = sqrt(preds_per_patch)); `depth` ConvNeXt
    blocks; 1x1 conv to the classes; bilinear (align_corners=False) upsampling to the image size.

    `skip_dim` > 0 (ours, not in the official head; 0 keeps it exactly official) adds a UNETR-style
    image skip: two 3x3 convs of `skip_dim` channels on the input image at full resolution, fused with
    the upsampled token features by a 3x3 conv before the classifier. A 16 px token cannot place the
    edge of a 3-pixel fluid pocket; the image can. forward then needs `image` (B x 1 x H x W).
    `skip_levels` > 1 makes the skip a small U-Net path: `skip_levels - 1` more stages at strides 2, 4,
    ... (stride-2 3x3 conv + 3x3 conv, channels doubling), fused coarse to fine - the token features
    enter at the coarsest level, each fusion (3x3 conv) is upsampled into the next finer one. A pocket
    a few tens of pixels wide is then seen with its surroundings at a resolution tokens do not have.
    `skip_norm = "batch"` puts a BatchNorm after every conv of that path (folded into the conv on export).
    """

    def __init__(self, in_dim: int, num_classes: int, preds_per_patch: int = 16, class_dim: int = 384,
                 depth: int = 4, interpolate_mode: str = "bilinear", skip_dim: int = 0,
                 skip_levels: int = 1, skip_norm: str = "") -> None:
        super().__init__()
        side = math.isqrt(preds_per_patch)
        if side * side != preds_per_patch:
            raise ConfigError(f"preds_per_patch must be a square number, got {preds_per_patch}")
        self.config = dict(type="convnext", in_dim=in_dim, num_classes=num_classes,
                           preds_per_patch=preds_per_patch, class_dim=class_dim, depth=depth,
                           interpolate_mode=interpolate_mode)
        if skip_dim:  # only when used, so official head configs stay as they were
            if int(skip_dim) < 0:
                raise ConfigError(f"skip_dim must be >= 0, got {skip_dim}")
            self.config["skip_dim"] = int(skip_dim)
        if int(skip_levels) != 1:
            if int(skip_levels) < 1 or not skip_dim:
                raise ConfigError(f"skip_levels must be >= 1 and needs skip_dim > 0, got skip_levels={skip_levels} "
                                  f"with skip_dim={skip_dim}")
            self.config["skip_levels"] = int(skip_levels)
        if skip_norm:
            if skip_norm != "batch" or not skip_dim:
                raise ConfigError(f"skip_norm must be \"batch\" or empty and needs skip_dim > 0, got "
                                  f"skip_norm={skip_norm!r} with skip_dim={skip_dim}")
            self.config["skip_norm"] = skip_norm
        self.num_classes, self.side, self.class_dim = num_classes, side, class_dim
        self.interpolate_mode = interpolate_mode
        self.needs_image = bool(skip_dim)
        self.proj_dec = nn.Linear(in_dim, preds_per_patch * class_dim)
        self.blocks = nn.ModuleList([ConvNeXtBlock(class_dim) for _ in range(depth)])
        if skip_dim:
            c = int(skip_dim)
            ch = [c * 2 ** k for k in range(int(skip_levels))]  # level k: stride 2**k

            def conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
                # no norm: the module indices of heads saved before skip_norm existed
                norm = [nn.BatchNorm2d(cout)] if skip_norm else []
                return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), *norm, nn.GELU()]

            self.skip = nn.Sequential(*conv(1, c), *conv(c, c))
            if len(ch) > 1:  # only when used, so skip heads saved before load unchanged
                self.skip_down = nn.ModuleList(
                    nn.Sequential(*conv(ch[k - 1], ch[k], 2), *conv(ch[k], ch[k])) for k in range(1, len(ch)))
                self.fuse_up = nn.ModuleList(
                    nn.Sequential(*conv((ch[k + 1] if k + 1 < len(ch) else ch[k]) + ch[k], ch[k]))
                    for k in range(1, len(ch)))
            self.fuse_in = nn.Conv2d(class_dim, ch[-1], kernel_size=1)
            self.fuse = nn.Sequential(*conv((ch[1] if len(ch) > 1 else c) + c, c))
            self.final_layer = nn.Conv2d(c, num_classes, kernel_size=1)
        else:
            self.final_layer = nn.Conv2d(class_dim, num_classes, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int],
                image_size: tuple[int, int], image: torch.Tensor | None = None) -> torch.Tensor:
        b = tokens.shape[0]
        gh, gw = grid
        s, c = self.side, self.class_dim
        x = self.proj_dec(tokens).reshape(b, gh, gw, s, s, c)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * s, gw * s)
        for blk in self.blocks:
            x = blk(x)
        if self.needs_image:
            if image is None:
                raise ConfigError("this segmentation head has an image skip (skip_dim > 0) and needs the image")
            skips = [self.skip(image.to(x.dtype))]
            for down in getattr(self, "skip_down", ()):
                skips.append(down(skips[-1]))
            x = self.fuse_in(x)
            for k in reversed(range(len(skips))):  # coarse to fine; one level is the original image skip
                x = F.interpolate(x, size=tuple(skips[k].shape[-2:]), mode="bilinear", align_corners=False)
                x = (self.fuse if k == 0 else self.fuse_up[k - 1])(torch.cat([x, skips[k]], dim=1))
        x = self.final_layer(x)
        if tuple(x.shape[-2:]) == tuple(image_size):
            return x  # resampling to the same size is the identity; in an exported graph it is not free
        align = False if self.interpolate_mode in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=tuple(image_size), mode=self.interpolate_mode, align_corners=align)


class ClsHead(nn.Module):
    """LayerNorm(D, eps 1e-6) on all tokens -> pooling -> Linear (the official MIRAGECls* heads).

    pool: "global" (mean of patch tokens), "cls" (mean of the global tokens; there is one in
    MIRAGE), "token_mix" (concatenation [patch mean, global], head input 2D).
    forward(patch_tokens B x N x D, global_tokens B x G x D) -> B x K logits.
    """

    POOLS = ("global", "cls", "token_mix")

    def __init__(self, in_dim: int, num_classes: int, pool: str = "global") -> None:
        super().__init__()
        if pool not in self.POOLS:
            raise ConfigError(f"unknown pooling {pool!r}; choose one of {list(self.POOLS)}")
        self.config = dict(type="cls", in_dim=in_dim, num_classes=num_classes, pool=pool)
        self.pool, self.num_classes = pool, num_classes
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.fc = nn.Linear(in_dim * (2 if pool == "token_mix" else 1), num_classes)

    def forward(self, patch_tokens: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        if self.pool == "global":
            feat = self.norm(patch_tokens).mean(dim=1)
        elif self.pool == "cls":
            feat = self.norm(global_tokens).mean(dim=1)
        else:
            feat = torch.cat([self.norm(patch_tokens).mean(dim=1), self.norm(global_tokens).mean(dim=1)],
                             dim=-1)
        return self.fc(feat)


class FPNSegHead(nn.Module):
    """A light FPN decoder for CNN students: multi-scale stage maps -> B x K x H x W logits.

    forward(feats: list of B x C_i x h_i x w_i, finest first (the encoder stages `stages`), image_size).
    Each map gets a 1x1 lateral conv to `dim` channels; from the coarsest, the sum is upsampled
    (nearest, x2) and added to the next finer lateral; a 3x3 conv + BN + ReLU on the finest sum, a
    1x1 conv to the classes, bilinear upsampling to the image size. Unlike the token heads it sees
    the stride-4/8 maps, where few-pixel lesions (fluid pockets) still exist.

    smooth: "conv" (a full 3x3 conv) or "dw" (a depthwise 3x3 + BN, then a 1x1 conv): at the finest
    map the full conv is most of the head's cost - at 512 x 512 and dim 64, 0.6 GMAC, about the
    MobileNetV4 encoder's own - and "dw" cuts it 8x (benchmarks/results/README.md, "faster student").
    """

    multiscale = True

    def __init__(self, in_channels: list[int], num_classes: int, stages: list[int], dim: int = 64,
                 smooth: str = "conv") -> None:
        super().__init__()
        if len(in_channels) != len(stages) or not stages:
            raise ConfigError(f"fpn head: {len(in_channels)} channel counts for stages {stages}")
        if smooth not in ("conv", "dw"):
            raise ConfigError(f"fpn head: smooth must be 'conv' or 'dw', got {smooth!r}")
        self.config = dict(type="fpn", in_channels=[int(c) for c in in_channels], num_classes=num_classes,
                           stages=[int(i) for i in stages], dim=dim)
        if smooth != "conv":  # written only when set, so configs saved before the option load unchanged
            self.config["smooth"] = smooth
        self.stages, self.num_classes = list(stages), num_classes
        self.lateral = nn.ModuleList([nn.Conv2d(c, dim, kernel_size=1) for c in in_channels])
        if smooth == "dw":
            self.smooth = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False),
                                        nn.BatchNorm2d(dim), nn.Conv2d(dim, dim, kernel_size=1, bias=False),
                                        nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        else:
            self.smooth = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False),
                                        nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.final_layer = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, feats: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        x = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            x = lat(f) + F.interpolate(x, size=tuple(f.shape[-2:]), mode="nearest")
        x = self.final_layer(self.smooth(x))
        if tuple(x.shape[-2:]) == tuple(image_size):
            return x
        return F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)


def build_head(config: dict) -> nn.Module:
    """Head from its saved `config` dict (``type`` = convnext | cls)."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    try:
        if kind == "convnext":
            return ConvNeXtSegHead(**cfg)
        if kind == "cls":
            return ClsHead(**cfg)
        if kind == "fpn":
            return FPNSegHead(**cfg)
    except TypeError as exc:
        raise ConfigError(f"bad head config {config}: {exc}") from None
    raise ConfigError(f"unknown head type {kind!r} (expected 'convnext', 'fpn' or 'cls')")
