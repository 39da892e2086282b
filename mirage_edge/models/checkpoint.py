"""Reading official MIRAGE checkpoints and ours; strict loading; saving our format.

Formats (ARCHITECTURE.md §14):
* official ``.pth``: ``{"model": state_dict, "optimizer", "epoch", "scaler", "args": Namespace}``;
  read with ``torch.load(weights_only=True)`` + ``argparse.Namespace`` allow-listed, never
  ``weights_only=False`` (a pickle that would run code is refused);
* Hugging Face layout: a folder with ``config.json`` ({input_size, modalities, patch_size, size})
  and ``model.safetensors`` (or, from older hub versions, ``pytorch_model.bin``) whose keys are
  ``model.`` + the .pth key (unprefixed also accepted);
* ours: a folder with ``model.safetensors`` + ``config.json`` ({"format": "mirage-edge", ...}).

The architecture is always taken from the file itself (tensor shapes + metadata); one pure
key-remapping function per family turns its keys into ours (our names are the official ones).
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mirage_edge._io import atomic_path, atomic_write_text
from mirage_edge.errors import CheckpointError
from mirage_edge.models.config import HEADS_BY_DIM, LAYERMAP, MODALITIES, MirageConfig

FORMAT = "mirage-edge"
FORMAT_VERSION = 1
StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- key remapping (pure)
def remap_official_pth(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official pretraining ``checkpoint["model"]`` -> our keys (identical names; a DDP
    ``module.`` prefix, if a run saved one, is stripped)."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def remap_hf(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """HF ``model.safetensors`` -> our keys: strip the ``model.`` prefix (unprefixed keys pass)."""
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()}


def remap_official_seg(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official segmentation fine-tuning ``model`` dict -> `SegmentationModel` keys.

    ``output_adapters.semseg.*`` (the ConvNeXt head) -> ``head.*``; every other key (global token,
    bscan adapter, blocks) -> ``encoder.*``. A head-only file gives only ``head.*`` keys.
    """
    out: StateDict = {}
    for k, v in remap_official_pth(state_dict).items():
        if k.startswith("output_adapters.semseg."):
            out["head." + k[len("output_adapters.semseg."):]] = v
        else:
            out["encoder." + k] = v
    return out


# --------------------------------------------------------------------------- reading files
@dataclass
class RawCheckpoint:
    format: str  # "ours" | "hf" | "official_pth" | "state_dict"
    state_dict: StateDict
    path: Path
    config: dict | None = None  # config.json (ours / hf)
    args: dict | None = None  # vars(args) of an official .pth


def checkpoint_file_kind(path: Path) -> str:
    """What a weights file holds by its first bytes: "zip" (torch.save), "pickle" (legacy torch.save,
    pickle protocol 2-5), "safetensors", "empty", or "" (none of them, e.g. random bytes or text)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
        size = fh.seek(0, 2)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return ""


def _refuse_unknown_bytes(path: Path, expected: str) -> None:
    """Name the real cause when `path` holds no weights at all, before a loader reports a misleading one
    (torch.load calls random bytes "a refused pickle")."""
    try:
        kind = checkpoint_file_kind(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if kind == "empty":
        raise CheckpointError(f"{path} is not a checkpoint: the file is empty")
    if kind == "safetensors" and expected != "safetensors":
        raise CheckpointError(f"{path} is a safetensors file: name it *.safetensors (or give the folder holding "
                              "it with its config.json)")
    if kind in ("zip", "pickle") and expected == "safetensors":
        raise CheckpointError(f"{path} is a PyTorch file (torch.save), not safetensors: name it *.pth")
    if not kind:
        raise CheckpointError(f"{path} is not a checkpoint: neither a PyTorch file (torch.save zip or pickle) "
                              "nor safetensors")


def torch_load_safe(path: Path) -> Any:
    """torch.load with weights_only=True; only argparse.Namespace is allow-listed extra."""
    _refuse_unknown_bytes(path, "torch")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # mmap: a 1.3 GB Large file (+ optimizer state) is not read into memory twice
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: it contains objects other than tensors and plain "
            f"containers ({str(exc).splitlines()[0][:200]}). Only weights_only loading is allowed."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): "
                              f"{str(exc).splitlines()[0][:200]}") from None


def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    _refuse_unknown_bytes(path, "safetensors")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {exc}") \
            from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _config_kind(cfg: dict) -> str | None:
    if cfg.get("format") == FORMAT:
        return "ours"
    if "size" in cfg or "modalities" in cfg:
        return "hf"
    return None


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read any supported checkpoint into a RawCheckpoint (keys not yet remapped)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() or path.suffix == ".safetensors":
        folder = path if path.is_dir() else path.parent
        weights = folder / "model.safetensors" if path.is_dir() else path
        cfg_path = folder / "config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else None
        kind = _config_kind(cfg) if cfg is not None else None
        if path.is_dir() and kind is None:
            raise CheckpointError(f"{path}: not a checkpoint folder (need config.json of mirage-edge or "
                                  "of the official Hugging Face release, and model.safetensors)")
        bin_path = folder / "pytorch_model.bin"
        if kind == "hf" and path.is_dir() and not weights.is_file() and bin_path.is_file():
            # older PyTorchModelHubMixin snapshots: a plain state dict, read weights_only like a .pth
            sd = torch_load_safe(bin_path)
            if not (isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values())):
                raise CheckpointError(f"{bin_path}: not a state dict of tensors")
            return RawCheckpoint("hf", dict(sd), path, config=cfg)
        return RawCheckpoint(kind or "state_dict", _load_safetensors(weights), path, config=cfg)
    obj = torch_load_safe(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        args = dict(args) if isinstance(args, Mapping) else None
        return RawCheckpoint("official_pth", dict(obj["model"]), path, args=args)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return RawCheckpoint("state_dict", dict(obj), path)
    raise CheckpointError(f"{path}: not a model checkpoint (top-level {type(obj).__name__} "
                          f"with keys {list(obj)[:8] if isinstance(obj, Mapping) else '-'})")


# --------------------------------------------------------------------------- architecture inference
def _indices(keys, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def infer_mirage_config(sd: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None,
                        hint: MirageConfig | None = None, source: str = "checkpoint") -> MirageConfig:
    """MirageConfig from an (our-keys) state dict, following the §14.1 recipe.

    Widths, depth, patches, native grids, class embedding and decoders come from tensor shapes;
    head counts (not readable from shapes) from `hint`, then the width (768 -> 12, 1024 -> 16),
    and `args.decoder_num_heads`. Fields of `hint` that the shapes contradict raise CheckpointError.
    """
    if "global_tokens" not in sd or not any(k.startswith("encoder.") for k in sd):
        sample = ", ".join(list(sd)[:6])
        raise CheckpointError(f"{source}: not a MIRAGE checkpoint (no 'global_tokens'/'encoder.*' keys; "
                              f"found e.g. {sample})")
    args = dict(args or {})
    g = sd["global_tokens"]
    dim = int(g.shape[-1])
    depth = len(_indices(sd, "encoder."))
    if hint is not None:
        heads = hint.num_heads
    elif dim in HEADS_BY_DIM:
        heads = HEADS_BY_DIM[dim]
    else:
        raise CheckpointError(f"{source}: encoder width {dim} is neither Base (768) nor Large (1024); the "
                              "head count cannot be read from tensor shapes - pass config=<json with "
                              "num_heads ...>")
    fc1 = sd["encoder.0.mlp.fc1.weight"]
    in_domains = [m for m in MODALITIES if f"input_adapters.{m}.proj.weight" in sd]
    out_domains = [m for m in MODALITIES if f"output_adapters.{m}.out_proj.weight" in sd]
    unknown = sorted({k.split(".")[1] for k in sd if k.startswith(("input_adapters.", "output_adapters."))}
                     - set(MODALITIES))
    if unknown:
        raise CheckpointError(f"{source}: unknown modality adapters {unknown} "
                              f"(MIRAGE has {list(MODALITIES)})")
    patch, grid = {}, {}
    for m in in_domains:
        patch[m] = list(sd[f"input_adapters.{m}.proj.weight"].shape[-2:])
        table = sd.get(f"input_adapters.{m}.pos_emb")
        grid[m] = list(table.shape[-2:]) if table is not None else None
    fields: dict[str, Any] = dict(
        dim_tokens=dim, depth=depth, num_heads=heads, mlp_ratio=fc1.shape[0] / dim,
        qkv_bias="encoder.0.attn.qkv.bias" in sd, num_global_tokens=int(g.shape[1]),
        in_domains=in_domains, out_domains=out_domains,
    )
    if LAYERMAP in in_domains:
        ce = sd[f"input_adapters.{LAYERMAP}.class_emb.weight"]
        fields.update(semseg_num_classes=int(ce.shape[0]), semseg_dim_class_emb=int(ce.shape[1]))
    if out_domains:
        t0 = out_domains[0]
        ddim = int(sd[f"output_adapters.{t0}.proj_context.weight"].shape[0])
        if hint is not None and hint.out_domains:
            dheads = hint.decoder_num_heads
        elif "decoder_num_heads" in args:
            dheads = int(args["decoder_num_heads"])
        elif ddim == 256:
            dheads = 8
        else:
            raise CheckpointError(f"{source}: decoder width {ddim} but no decoder_num_heads in args/config")
        chans = {}
        for t in out_domains:
            if t not in patch:
                raise CheckpointError(f"{source}: decoder {t!r} without an input adapter is not supported")
            n = int(sd[f"output_adapters.{t}.out_proj.weight"].shape[0])
            chans[t] = n // (patch[t][0] * patch[t][1])
            grid[t] = grid.get(t) or list(sd[f"output_adapters.{t}.pos_emb"].shape[-2:])
        fields.update(
            decoder_dim=ddim, decoder_depth=len(_indices(sd, f"output_adapters.{t0}.decoder_transformer.")),
            decoder_num_heads=dheads,
            decoder_mlp_ratio=sd[f"output_adapters.{t0}.mlp.fc1.weight"].shape[0] / ddim,
            decoder_num_channels=chans,
        )
    for m in in_domains:
        if grid[m] is None:  # no table stored: fall back to the hint / args native size
            size = (hint.input_size.get(m) if hint else None) or (args.get("input_size") or {}).get(m)
            if size is None:
                raise CheckpointError(f"{source}: no pos_emb for {m!r} and no input size in config/args")
            grid[m] = [size[0] // patch[m][0], size[1] // patch[m][1]]
    fields["input_size"] = {m: [grid[m][0] * patch[m][0], grid[m][1] * patch[m][1]] for m in in_domains}
    fields["patch_size"] = patch
    fields["pos_grid"] = {m: list(grid[m]) for m in in_domains}
    if hint is not None:
        fields["layernorm_eps"] = hint.layernorm_eps
        for name in ("dim_tokens", "depth", "num_global_tokens", "semseg_num_classes", "semseg_dim_class_emb",
                     "decoder_dim", "decoder_depth"):
            if name in fields and hint_value_differs(hint, name, fields[name], in_domains, out_domains):
                raise CheckpointError(f"{source}: config says {name}={getattr(hint, name)} but the "
                                      f"checkpoint has {fields[name]}")
    try:
        return MirageConfig(**fields)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: inconsistent architecture: {exc}") from None


def hint_value_differs(hint: MirageConfig, name: str, value: Any, in_domains: list,
                       out_domains: list) -> bool:
    if name.startswith("semseg") and (LAYERMAP not in in_domains or getattr(hint, name) is None):
        return False  # null in the config: "no layer map declared", the checkpoint's shapes decide
    if name.startswith("decoder") and not out_domains:
        return False
    return getattr(hint, name) != value


# --------------------------------------------------------------------------- strict loading
def _pos_mode(model: nn.Module, key: str) -> str:
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    return getattr(owner, "pos_mode", "bilinear")


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor],
                           source: str = "checkpoint") -> None:
    """Load `sd` into `model` strictly; positional tables of another grid are resized first.

    Fixed ``*.pos_emb`` tables whose grid differs from the model's are resized explicitly
    (bicubic for image adapters, bilinear for the layer map and decoders - the official rules).
    Missing keys, unexpected keys and shape mismatches raise one CheckpointError naming them.
    """
    from mirage_edge.models.pos_embed import resize_pos_embed

    own = model.state_dict()
    sd = dict(sd)
    for k, v in list(sd.items()):
        if k.endswith("pos_emb") and k in own and v.dim() == 4 and own[k].dim() == 4 \
                and v.shape[:2] == own[k].shape[:2] and v.shape != own[k].shape:
            sd[k] = resize_pos_embed(v, tuple(own[k].shape[-2:]), _pos_mode(model, k))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]

    def show(items: list[str]) -> str:
        return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {show(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True, assign=next(iter(own.values())).device.type == "meta")


# --------------------------------------------------------------------------- building from files
def _drop_unused(sd: StateDict, cfg: MirageConfig) -> StateDict:
    """Drop adapters/decoders the caller explicitly left out via in_domains/out_domains overrides."""
    def keep(k: str) -> bool:
        if k.startswith("input_adapters."):
            return k.split(".")[1] in cfg.in_domains
        if k.startswith("output_adapters."):
            return k.split(".")[1] in cfg.out_domains and (
                ".task_embeddings." not in k or k.rsplit(".", 1)[1] in cfg.in_domains)
        return True
    return {k: v for k, v in sd.items() if keep(k)}


def build_mirage_from_state_dict(sd: StateDict, args: Mapping | None, hint: MirageConfig | None,
                                 overrides: Mapping[str, Any], source: str,
                                 device: str | torch.device = "cpu") -> nn.Module:
    from mirage_edge.models.mirage import MIRAGE

    cfg = infer_mirage_config(sd, args, hint, source)
    cfg = cfg.with_options(overrides)
    if {"in_domains", "out_domains"} & set(overrides):
        sd = _drop_unused(sd, cfg)
    with torch.device(device):
        model = MIRAGE(cfg)
    load_state_dict_strict(model, sd, source)
    return model


def load_model(path: str | Path, config: MirageConfig | Mapping | str | Path | None = None,
               **overrides: Any) -> nn.Module:
    """Build + strictly load the model a checkpoint describes (any supported format).

    `config` supplies what shapes cannot tell (head counts) for sizes other than Base/Large;
    `overrides` (e.g. ``input_size=1024``, ``out_domains=[]``) change the built model, with
    positional tables resized explicitly at load time.
    """
    return model_from_raw(read_checkpoint(path), config, **overrides)


def model_from_raw(raw: RawCheckpoint, config: MirageConfig | Mapping | str | Path | None = None,
                   **overrides: Any) -> nn.Module:
    """`load_model` on an already-read checkpoint (tests synthesize these on the meta device)."""
    source = str(raw.path)
    hint = MirageConfig.load(config) if config is not None else None
    if raw.format == "ours":
        return _load_ours(raw, overrides)
    # Shape-only checkpoints (meta tensors) build a meta model: no memory for Base/Large.
    device = "meta" if any(v.device.type == "meta" for v in raw.state_dict.values()) else "cpu"
    if raw.format == "hf":
        sd = remap_hf(raw.state_dict)
        size = (raw.config or {}).get("size")
        if hint is None and size in ("base", "large"):
            from mirage_edge.models.config import SIZES

            hint = MirageConfig(**SIZES[f"mirage-{size}"], out_domains=[])
        model = build_mirage_from_state_dict(sd, None, hint, overrides, source, device)
    else:
        args = raw.args if raw.format == "official_pth" else None
        sd = remap_official_pth(raw.state_dict)
        model = build_mirage_from_state_dict(sd, args, hint, overrides, source, device)
    model.mirage_edge_source = {"path": source, "format": raw.format}
    return model


# --------------------------------------------------------------------------- our format
def _encoder_spec(encoder: nn.Module) -> dict:
    from mirage_edge.models.mirage import MIRAGE

    if isinstance(encoder, MIRAGE):
        return {"type": "mirage", "architecture": encoder.cfg.to_dict()}
    spec = getattr(encoder, "mirage_edge_spec", None)
    if spec is None:
        raise CheckpointError(f"cannot save encoder {type(encoder).__name__}: build it with create_model() "
                              "so it carries `mirage_edge_spec` (registry name + kwargs)")
    return {"type": "registry", "name": spec["name"], "kwargs": dict(spec.get("kwargs", {}))}


def save_model(model: nn.Module, out_dir: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (MIRAGE, registry encoder, or task model) as model.safetensors + config.json.

    Each file is written atomically; config.json goes last, so a folder with a config.json is
    complete. `extra` (JSON-able) is stored under "meta". Returns the folder.
    """
    from safetensors.torch import save_file

    from mirage_edge.models.task import TaskModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, TaskModel):
        cfg = {"kind": model.task, "encoder": _encoder_spec(model.encoder), "head": dict(model.head.config)}
    else:
        cfg = {"kind": "encoder", "encoder": _encoder_spec(model)}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **cfg, "meta": dict(extra or {})}
    atomic_write_text(out / "config.json", json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return out


def _build_encoder(spec: Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> nn.Module:
    from mirage_edge.models.mirage import MIRAGE

    if spec.get("type") == "mirage":
        cfg = MirageConfig.from_dict(spec["architecture"], source=source)
        return MIRAGE(cfg.with_options(overrides))
    if spec.get("type") == "registry":
        from mirage_edge.models.registry import build_model

        return build_model(spec["name"], **{**spec.get("kwargs", {}), **overrides})
    raise CheckpointError(f"{source}: unknown encoder type {spec.get('type')!r}")


def _load_ours(raw: RawCheckpoint, overrides: Mapping[str, Any]) -> nn.Module:
    from mirage_edge.models.heads import build_head
    from mirage_edge.models.task import TASK_CLASSES

    cfg = raw.config or {}
    source = str(raw.path)
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {cfg['format_version']} is newer than this "
                              f"mirage-edge understands ({FORMAT_VERSION}); upgrade mirage-edge")
    try:
        encoder = _build_encoder(cfg["encoder"], overrides, source)
        kind = cfg.get("kind", "encoder")
        if kind == "encoder":
            model = encoder
        elif kind in TASK_CLASSES:
            model = TASK_CLASSES[kind](encoder, build_head(cfg["head"]))
        else:
            raise CheckpointError(f"{source}: unknown model kind {kind!r}")
    except KeyError as exc:
        raise CheckpointError(f"{source}/config.json lacks {exc}") from None
    load_state_dict_strict(model, raw.state_dict, source)
    model.mirage_edge_source = {"path": source, "format": "ours"}
    return model


def convert(src: str | Path, out_dir: str | Path, config: Any = None, **overrides: Any) -> nn.Module:
    """Read any supported checkpoint and write it in our format; returns the loaded model."""
    model = load_model(src, config=config, **overrides)
    save_model(model, out_dir, extra={"converted_from": str(src)})
    return model
