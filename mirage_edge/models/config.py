"""Architecture config of MIRAGE (`MirageConfig`) and weights metadata (`PretrainedCfg`), torch-free.

The two are kept apart on purpose (timm `PretrainedCfg` style): the architecture says how to build
the network, the pretrained cfg says where its weights come from (file, URL, checksum, licence).
Field names follow the official pretraining `args` / the fixtures' ``tiny_config.json``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mirage_edge import config as _cfg
from mirage_edge.errors import ConfigError

IMAGE_MODALITIES = ("bscan", "slo")
LAYERMAP = "bscanlayermap"
MODALITIES = (*IMAGE_MODALITIES, LAYERMAP)

# Keys of tiny_config.json that describe the fixture run, not the architecture (ignored on load).
_NON_ARCH_KEYS = {"batch", "seed", "seg_head"}


def _default_sizes(img: int = 512, patch: int = 32, lm_patch: int = 8) -> tuple[dict, dict]:
    grid = img // patch
    sizes = {"bscan": [img, img], "slo": [img, img], LAYERMAP: [grid * lm_patch, grid * lm_patch]}
    patches = {"bscan": [patch, patch], "slo": [patch, patch], LAYERMAP: [lm_patch, lm_patch]}
    return sizes, patches


@dataclass
class MirageConfig:
    """Every dimension of a MIRAGE network.

    `input_size`/`patch_size` are per modality ``[H, W]``; token grid = input_size / patch_size.
    `pos_grid` is the grid the sin-cos positional tables were generated on (the pretraining grid);
    when `input_size` gives another grid, the tables are resized from it (bicubic for images,
    bilinear for the layer map and decoders), exactly like the official loaders. ``None`` means
    "the model's own grid".
    """

    dim_tokens: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layernorm_eps: float = 1e-6
    num_global_tokens: int = 1
    in_domains: list[str] = field(default_factory=lambda: list(MODALITIES))
    out_domains: list[str] = field(default_factory=lambda: list(MODALITIES))
    input_size: dict[str, list[int]] = field(default_factory=lambda: _default_sizes()[0])
    patch_size: dict[str, list[int]] = field(default_factory=lambda: _default_sizes()[1])
    grid_size: dict[str, list[int]] | None = None  # derived; accepted (and checked) for tiny_config.json
    pos_grid: dict[str, list[int]] | None = None
    # Official configs of models without the layer map carry these as null (or omit them).
    semseg_num_classes: int | None = 13
    semseg_dim_class_emb: int | None = 64
    semseg_interpolate_class_emb: bool | None = False
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_ratio: float = 4.0
    decoder_use_task_queries: bool = True
    decoder_use_xattn: bool = True
    decoder_num_channels: dict[str, int] = field(
        default_factory=lambda: {"bscan": 1, "slo": 1, LAYERMAP: 13}
    )

    def __post_init__(self) -> None:
        self.in_domains = list(self.in_domains)
        self.out_domains = list(self.out_domains)
        self.input_size = {k: [int(x) for x in as_pair(v)] for k, v in self.input_size.items()}
        self.patch_size = {k: [int(x) for x in as_pair(v)] for k, v in self.patch_size.items()}
        for name in self.in_domains + self.out_domains:
            if name not in MODALITIES:
                raise ValueError(f"unknown modality {name!r}; MIRAGE knows {list(MODALITIES)}")
            if name not in self.input_size or name not in self.patch_size:
                raise ValueError(f"modality {name!r} needs an entry in input_size and patch_size")
        if not self.in_domains:
            raise ValueError("in_domains is empty")
        if self.dim_tokens % self.num_heads or self.dim_tokens % 4:
            raise ValueError(f"dim_tokens {self.dim_tokens} must be divisible by num_heads "
                             f"{self.num_heads} and by 4 (sin-cos table)")
        if self.out_domains and (self.decoder_dim % self.decoder_num_heads or self.decoder_dim % 4):
            raise ValueError(f"decoder_dim {self.decoder_dim} must be divisible by decoder_num_heads "
                             f"{self.decoder_num_heads} and by 4")
        if LAYERMAP in self.in_domains + self.out_domains:
            for name in ("semseg_num_classes", "semseg_dim_class_emb"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is null but {LAYERMAP!r} is one of the domains; give the "
                                     "layer map's class count and class-embedding width")
        if self.semseg_interpolate_class_emb:
            raise ValueError("semseg_interpolate_class_emb=True is not used by any MIRAGE model")
        if self.out_domains and not (self.decoder_use_task_queries and self.decoder_use_xattn):
            raise ValueError("only decoders with task queries and cross-attention are implemented")
        for name in self.in_domains + self.out_domains:
            h, w = self.input_size[name]
            ph, pw = self.patch_size[name]
            if h % ph or w % pw:
                raise ValueError(f"input_size {h}x{w} of {name!r} is not a multiple of its patch {ph}x{pw}")
        grids = {m: self.grid(m) for m in self.input_size if m in self.patch_size}
        if self.grid_size is not None:
            for m, g in self.grid_size.items():
                if m in grids and list(g) != list(grids[m]):
                    raise ValueError(f"grid_size[{m!r}]={list(g)} disagrees with input_size/patch_size "
                                     f"({grids[m]})")
        self.grid_size = {m: list(g) for m, g in grids.items()}
        if self.pos_grid is None:
            self.pos_grid = {m: list(g) for m, g in grids.items()}
        else:
            self.pos_grid = {m: [int(x) for x in as_pair(v)] for m, v in self.pos_grid.items()}
            for m in grids:
                self.pos_grid.setdefault(m, list(grids[m]))
        if self.out_domains:
            ref = tuple(self.grid(self.out_domains[0]))
            for m in self.in_domains + self.out_domains:
                if tuple(self.grid(m)) != ref:
                    # The decoders add the output modality's table to every input block (§8).
                    raise ValueError("decoders need every modality on the same token grid; got "
                                     + ", ".join(f"{k}={self.grid(k)}" for k in self.in_domains))

    def grid(self, modality: str) -> tuple[int, int]:
        (h, w), (ph, pw) = self.input_size[modality], self.patch_size[modality]
        return h // ph, w // pw

    def with_input_size(self, size: int | tuple[int, int] | list[int] | Mapping[str, Any]) -> "MirageConfig":
        """Same network for image inputs of `size` (int, (H, W), or a dict modality -> [H, W]).

        The layer map keeps the image token grid (its size = grid x its patch), as the official
        wrapper does. Positional tables keep their generation grid (`pos_grid`) and get resized.
        """
        if isinstance(size, Mapping):  # explicit per-modality sizes
            merged = {**self.input_size, **{k: list(as_pair(v)) for k, v in size.items()}}
            return dataclasses.replace(self, input_size=merged, grid_size=None)
        h, w = as_pair(size)
        sizes = dict(self.input_size)
        ref_patch = self.patch_size.get("bscan") or self.patch_size.get("slo")
        if ref_patch is None:
            raise ValueError("with_input_size needs an image modality (bscan or slo)")
        if h % ref_patch[0] or w % ref_patch[1]:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {ref_patch}")
        gh, gw = h // ref_patch[0], w // ref_patch[1]
        for m in sizes:
            if m in IMAGE_MODALITIES:
                sizes[m] = [h, w]
            elif m in self.patch_size:
                p = self.patch_size[m]
                sizes[m] = [gh * p[0], gw * p[1]]
            else:
                raise ValueError(f"patch_size has no entry for {m!r} (input_size has one)")
        return dataclasses.replace(self, input_size=sizes, grid_size=None, pos_grid=self.pos_grid)

    def with_options(self, options: Mapping[str, Any]) -> "MirageConfig":
        """This network with MirageConfig fields replaced (``input_size``: int, (H, W) or per-modality
        dict, see `with_input_size`); ConfigError names unknown or invalid options.

        Positional tables keep their generation grid (`pos_grid`), so loaded weights stay valid.
        """
        options = dict(options)
        size = options.pop("input_size", None)
        _check_options(options)
        try:
            cfg = dataclasses.replace(self, **options, grid_size=None) if options else self
            if size is not None:
                cfg = cfg.with_input_size(size)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad model options {dict(options, input_size=size)}: {exc}") from None
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _cfg.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> "MirageConfig":
        """Strict load (unknown key -> ConfigError); the fixture-only keys of tiny_config.json are ignored."""
        data = {k: v for k, v in data.items() if k not in _NON_ARCH_KEYS}
        return _cfg.from_dict(cls, data, source=source)

    @classmethod
    def load(cls, cfg: "MirageConfig | Mapping[str, Any] | str | Path") -> "MirageConfig":
        """From a MirageConfig, a dict, or a JSON (or TOML) file path."""
        if isinstance(cfg, MirageConfig):
            return cfg
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        path = Path(cfg)
        data = _cfg.read_file(path)
        if "architecture" in data and isinstance(data["architecture"], Mapping):  # our config.json
            data = data["architecture"]
        return cls.from_dict(data, source=str(path))


def _check_options(options: Mapping[str, Any], where: str = "") -> None:
    fields = {f.name for f in dataclasses.fields(MirageConfig)}
    bad = [k for k in options if k not in fields]
    if bad:
        raise ConfigError(f"unknown MIRAGE option(s) {bad}{where} (allowed: {', '.join(sorted(fields))})")


def as_pair(v: Any) -> tuple[int, int]:
    """An int or [H, W] as (H, W)."""
    if isinstance(v, int):
        return v, v
    v = list(v)
    if len(v) != 2:
        raise ValueError(f"expected an int or [H, W], got {v!r}")
    return int(v[0]), int(v[1])


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a registered model's weights come from (kept apart from the architecture).

    `hf_hub_id` / `hf_revision`: the authors' Hugging Face repo and the revision we resolve it at
    (`PyTorchModelHubMixin` layout: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).
    `hf_sha256`: file name in that repo -> SHA-256 we know for it (None: not known, see the table).
    `file_name` / `url` / `sha256`: the GitHub release file, the fallback when the hub fails, also
    looked for by hand in the cache dir. A known hash is always checked before loading.
    """

    name: str
    file_name: str | None = None
    url: str | None = None
    sha256: str | None = None
    hf_hub_id: str | None = None
    hf_revision: str = "main"
    hf_sha256: Mapping[str, str | None] = field(default_factory=dict, compare=False, hash=False)
    input_size: tuple[int, int] = (512, 512)
    modalities: tuple[str, ...] = MODALITIES
    license: str = "unknown"
    notes: str = ""


_LICENSE = ("CC BY-NC-ND 4.0 in the June 2025 snapshot of j-morano/MIRAGE (cd7ae4f); newer README "
            "shows CC BY 4.0 - check the current LICENSE before redistributing")
_RELEASE = "https://github.com/j-morano/MIRAGE/releases/download/weights"

# The revision of j-morano/MIRAGE-{Base,Large} we resolve. The commit id could not be looked up where
# this was written (no network), so it is the branch "main" for now; every run records the commit it
# actually got (`weights_file.commit` in the teacher record), and pinning means putting that id here.
HUB_REVISION = "main"

# Known SHA-256 of the official files; None = not known to us, so nothing beyond the hub's own hash
# is checked, and the hash of what was loaded is recorded in the run (`weights_file.sha256`).
# - Hub files: the hub cache names each blob after the hash the hub published for it (LFS sha256,
#   or the git blob id of small files); `weights.resolve` checks the file against that name too.
# - Unconfirmed: a third-party model catalogue lists model.safetensors as bdb3ad17...c339 (Base,
#   348.11 MB) and 22c7da59...894c (Large, 1.22 GB); the sizes agree with the encoder-side tensor
#   counts (ARCHITECTURE.md §2/§14.2), but we have not downloaded the files, so they are not used.
# - The release .pth files publish no checksum.
_HUB_SHA256 = {"config.json": None, "model.safetensors": None, "pytorch_model.bin": None}
_NOTES = "official: hub = encoder (B-scan + SLO); release .pth = pretraining checkpoint (+ 3 decoders)"

PRETRAINED_CFGS: dict[str, PretrainedCfg] = {
    "mirage-base": PretrainedCfg(
        name="mirage-base", file_name="MIRAGE-Base.pth", url=f"{_RELEASE}/MIRAGE-Base.pth",
        sha256=None, hf_hub_id="j-morano/MIRAGE-Base", hf_revision=HUB_REVISION,
        hf_sha256=dict(_HUB_SHA256), license=_LICENSE, notes=_NOTES,
    ),
    "mirage-large": PretrainedCfg(
        name="mirage-large", file_name="MIRAGE-Large.pth", url=f"{_RELEASE}/MIRAGE-Large.pth",
        sha256=None, hf_hub_id="j-morano/MIRAGE-Large", hf_revision=HUB_REVISION,
        hf_sha256=dict(_HUB_SHA256), license=_LICENSE, notes=_NOTES,
    ),
    # No released weights: train it with `mirage-edge train`.
    "mirage-tiny": PretrainedCfg(name="mirage-tiny", license="Apache-2.0 (ours)",
                                 notes="no released weights; for tests/demos"),
}

# Official sizes (ARCHITECTURE.md §2) and our tiny one. Heads cannot be read from tensor shapes,
# so checkpoints without a config are mapped by width: 768 -> Base, 1024 -> Large.
SIZES: dict[str, dict[str, Any]] = {
    "mirage-base": dict(dim_tokens=768, depth=12, num_heads=12),
    "mirage-large": dict(dim_tokens=1024, depth=24, num_heads=16),
    "mirage-tiny": dict(dim_tokens=192, depth=4, num_heads=3, decoder_dim=128, decoder_depth=1,
                        decoder_num_heads=4),
}
HEADS_BY_DIM = {768: 12, 1024: 16}


def size_config(name: str, **overrides: Any) -> MirageConfig:
    """The MirageConfig of a registered size with field overrides (``input_size`` may be an int)."""
    size = overrides.pop("input_size", None)
    _check_options(overrides, f" for {name!r}")
    try:
        # A partial per-modality dict (e.g. patch_size={"bscan": [16, 16]}) updates the size's own table.
        base = MirageConfig(**SIZES[name])
        merged = {k: {**getattr(base, k), **v} if isinstance(v, dict) and isinstance(getattr(base, k), dict) else v
                  for k, v in overrides.items()}
        cfg = MirageConfig(**{**SIZES[name], **merged})
        if size is not None:
            cfg = cfg.with_input_size(size)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc
    return cfg
