"""`mirage-edge info MODEL` and `mirage-edge convert IN OUT_DIR` (torch imported inside commands)."""
from __future__ import annotations

import json

import click

from mirage_edge.errors import ConfigError


def _parse_size(value: str | None):
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.lower().replace("x", ",").split(",") if p]
    except ValueError:
        raise ConfigError(f"--input-size must be N or HxW, got {value!r}") from None
    if len(parts) not in (1, 2):
        raise ConfigError(f"--input-size must be N or HxW, got {value!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def describe(model, name: str) -> dict:
    """Facts `info` prints: architecture, parameter counts, FLOPs (meta-device count), weights place."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mirage_edge.models.mirage import MIRAGE

    info: dict = {"model": name, "class": type(model).__name__}
    enc = model if isinstance(model, MIRAGE) else getattr(model, "encoder", model)
    params = dict(model.named_parameters())
    info["params_total"] = sum(p.numel() for p in params.values())
    if isinstance(enc, MIRAGE):
        cfg = enc.cfg
        main = enc.default_modality
        # "encoder" = what a B-scan task runs: global token + the B-scan adapter + the blocks.
        pre = "" if model is enc else "encoder."
        starts = (f"{pre}encoder.", f"{pre}global_tokens", f"{pre}input_adapters.{main}.")
        enc_keys = [k for k in params if k.startswith(starts)]
        side = [k for k in params if "output_adapters." not in k and not k.startswith("head.")]
        info.update(
            architecture={k: v for k, v in cfg.to_dict().items() if k not in ("grid_size",)},
            modalities=list(cfg.in_domains), decoders=list(cfg.out_domains),
            input_size={m: list(v) for m, v in cfg.input_size.items() if m in cfg.in_domains},
            token_grid=list(enc.token_grid(*enc.input_size)),
            params_encoder=sum(params[k].numel() for k in enc_keys),
            params_encoder_all_adapters=sum(params[k].numel() for k in side),
            fixed_pos_table_elements=sum(b.numel() for n, b in model.named_buffers()
                                         if n.endswith("pos_emb")),
        )
        h, w = enc.input_size
    else:
        info["params_encoder"] = sum(p.numel() for p in enc.parameters())
        h, w = tuple(getattr(enc, "input_size", None) or (224, 224))
    # Count on the meta device: no real Large weights are allocated, and the CPU flash-attention
    # kernel is invisible to FlopCounterMode while its meta decomposition (bmm) is counted.
    meta = _meta_twin(model)
    with FlopCounterMode(display=False) as counter:
        x = torch.zeros(1, 1, h, w, device="meta")
        if hasattr(meta, "forward_features"):
            meta.forward_features(x)  # encoders: features only (MIRAGE decoders not run)
        else:
            meta(x)  # task models: encoder + head
    info["flops_per_image"] = int(counter.get_total_flops())
    info["flops_input"] = [1, 1, h, w]
    return info


def _meta_twin(model):
    """The same architecture on the meta device (shapes only)."""
    import copy

    if next(iter(model.parameters())).device.type == "meta":
        return model
    twin = copy.deepcopy(model)
    return twin.to_empty(device="meta")


def _weights_place(name: str) -> str:
    from mirage_edge.models.config import PRETRAINED_CFGS
    from mirage_edge.models.weights import cache_dir, candidates, find_local

    cfg = PRETRAINED_CFGS.get(name)
    if cfg is None:
        return "n/a (not a released model)"
    if not cfg.url and not cfg.hf_hub_id:
        return f"none released ({cfg.notes}); pass --checkpoint"
    found = find_local(cfg)
    if found:
        return f"found: {found}"
    hub = f"Hugging Face {cfg.hf_hub_id}@{cfg.hf_revision}" if cfg.hf_hub_id else ""
    src = "; download: " + ", else ".join(x for x in (hub, cfg.url or "") if x)
    return (f"not found; looked in {', '.join(str(c) for c in candidates(cfg))} (cache dir {cache_dir()}) "
            f"and the Hugging Face cache{src}")


@click.command("info")
@click.argument("model")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Describe this checkpoint instead of a size.")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON architecture (head counts) for checkpoints of non-official sizes.")
@click.option("--input-size", default=None, help="N or HxW: describe the model built for this image size.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info_cmd(model: str, checkpoint: str | None, config: str | None, input_size: str | None,
             as_json: bool) -> None:
    """Architecture, parameter counts, FLOPs, modalities and weights location of MODEL.

    MODEL is a registered name (mirage-tiny, mirage-base, mirage-large, students) or "mirage"
    with --checkpoint. Official sizes are built on the meta device (no weights allocated).
    """
    from mirage_edge.models.factory import create_model
    from mirage_edge.models.registry import list_models

    kwargs = {}
    size = _parse_size(input_size)
    if size is not None:
        kwargs["input_size"] = size
    if checkpoint:
        m = create_model(model, checkpoint=checkpoint, config=config, **kwargs)
    elif model.startswith("mirage-") and model in list_models("mirage-*"):
        m = create_model(model, device="meta", **kwargs)
    else:
        m = create_model(model, **kwargs)
    data = describe(m, model)
    data["weights"] = _weights_place(model) if not checkpoint else checkpoint
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"model          {model} ({data['class']})")
    if "architecture" in data:
        a = data["architecture"]
        click.echo(f"encoder        dim {a['dim_tokens']}, depth {a['depth']}, heads {a['num_heads']}, "
                   f"mlp x{a['mlp_ratio']:g}, {a['num_global_tokens']} global token(s), no final norm")
        click.echo(f"modalities     {', '.join(data['modalities'])}")
        click.echo("input sizes    " + ", ".join(f"{m} {s[0]}x{s[1]} (patch {a['patch_size'][m][0]})"
                                            for m, s in data["input_size"].items()))
        click.echo(f"token grid     {data['token_grid'][0]}x{data['token_grid'][1]} per modality")
        dec = data["decoders"]
        click.echo(f"decoders       {', '.join(dec) if dec else 'none'}"
                   + (f" (dim {a['decoder_dim']}, depth {a['decoder_depth']}, "
                      f"heads {a['decoder_num_heads']})" if dec else ""))
    mirage = "params_encoder_all_adapters" in data
    note = " (B-scan path: blocks + adapter + global token)" if mirage else ""
    click.echo(f"params         encoder {data['params_encoder'] / 1e6:.1f}M{note}")
    if mirage:
        n_all = data["params_encoder_all_adapters"] / 1e6
        click.echo(f"               encoder + all input adapters {n_all:.1f}M")
    click.echo(f"               total {data['params_total'] / 1e6:.1f}M (trainable tensors; fixed pos tables "
               "excluded)")
    h, w = data["flops_input"][2:]
    what = "encoder" if data["class"] != "SegmentationModel" and data["class"] != "ClassificationModel" \
        else "encoder + head"
    click.echo(f"FLOPs          {data['flops_per_image'] / 1e9:.2f} GFLOPs per {h}x{w} B-scan ({what}, "
               "FlopCounterMode)")
    click.echo(f"weights        {data['weights']}")


@click.command("convert")
@click.argument("src", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON architecture (head counts) for checkpoints of non-official sizes.")
@click.option("--input-size", default=None, help="N or HxW: resize positional tables for this image size.")
@click.option("--no-decoders", is_flag=True, help="Drop the reconstruction decoders (encoder only).")
def convert_cmd(src: str, out_dir: str, config: str | None, input_size: str | None,
                no_decoders: bool) -> None:
    """Convert an official MIRAGE checkpoint (.pth or HF folder) to our format (OUT_DIR)."""
    from mirage_edge.models.checkpoint import convert

    kwargs: dict = {}
    size = _parse_size(input_size)
    if size is not None:
        kwargs["input_size"] = size
    if no_decoders:
        kwargs["out_domains"] = []
    model = convert(src, out_dir, config=config, **kwargs)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {out_dir}/model.safetensors + config.json ({n / 1e6:.1f}M parameters)")
