"""The synthetic-vs-real figure (docs/synthetic_vs_real.png): generated samples beside real scans."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mirage_edge.data import synth_render as R
from mirage_edge.data.io import read_image
from mirage_edge.errors import DataError


def _synthetic(seed: int) -> dict[str, np.ndarray]:
    from mirage_edge.data.synth import SLO_FIELD, sample_lesions

    out: dict[str, np.ndarray] = {}
    for i, (key, disease, center, slice_idx) in enumerate([
            ("normal", "normal", "default", 8), ("dme", "dme", "default", 0),
            ("cnv", "cnv", "cirrus", 0), ("drusen", "drusen", "topcon", 0)]):
        rng = np.random.default_rng([seed, i])
        style = R.CENTERS[center]
        n = 16 if disease == "normal" else 1
        vol = R.sample_volume(rng, n, style)
        slo, vmask = R.render_slo(rng, vol, 512, SLO_FIELD)
        vol.vessels_x, vol.vessels_w = R.vessels_along_rows(vmask, SLO_FIELD, n)
        vol.lesions = sample_lesions(rng, disease, vol, single=n == 1)
        img, layers, fluid = R.render_bscan(rng, vol, slice_idx, (512, 512), style)
        out[key], out[key + "_layers"], out[key + "_fluid"] = img, layers, fluid
        if key == "normal":
            out["slo"] = R.scan_line(slo, SLO_FIELD, (slice_idx + 0.5) / n)
    return out


def synthetic_vs_real(out: str | Path, real_root: str | Path, seed: int = 0) -> Path:
    """Write a 3 x 4 panel: real scans, synthetic scans, and their labels. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mirage_edge._io import atomic_path

    real_root = Path(real_root)
    duke = real_root / "real" / "Duke_DME_fluid"
    example = real_root / "mirage_example"
    if not duke.is_dir() or not example.is_dir():
        raise DataError(f"real data not found under {real_root} (expected real/Duke_DME_fluid and mirage_example)")
    duke_imgs = sorted((duke / "train" / "bscan").glob("*.png"))
    masks = [read_image(p.parent.parent / "semseg" / p.name) for p in duke_imgs]
    with_fluid = [p for p, m in zip(duke_imgs, masks) if m.mean() > 0.004] or duke_imgs
    d1, d2 = read_image(duke_imgs[len(duke_imgs) // 3]), read_image(with_fluid[0])
    d2_mask = read_image(with_fluid[0].parent.parent / "semseg" / with_fluid[0].name)
    ex_b, ex_s, ex_l = (read_image(example / f) for f in ("bscan.npy", "slo.npy", "bscanlayermap.npy"))
    syn = _synthetic(seed)

    def overlay(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rgb = np.repeat((img.astype(np.float32) / img.max())[..., None], 3, axis=2)
        colours = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1]], np.float32)
        m = mask > 0
        rgb[m] = 0.45 * rgb[m] + 0.55 * colours[np.clip(mask[m], 0, 3)]
        return rgb

    panels = [
        ("real: Duke DME (Spectralis)", d1, "gray"), ("real: Duke DME, fluid", d2, "gray"),
        ("real: MIRAGE example B-scan", ex_b, "gray"), ("real: MIRAGE example SLO", ex_s, "gray"),
        ("synthetic: normal (default)", syn["normal"], "gray"), ("synthetic: DME (default)", syn["dme"], "gray"),
        ("synthetic: CNV (cirrus look)", syn["cnv"], "gray"), ("synthetic: SLO + scan line", syn["slo"], "gray"),
        ("real: MIRAGE layer map", ex_l, "tab20"), ("synthetic: layer map", syn["normal_layers"], "tab20"),
        ("real: Duke fluid mask", overlay(d2, d2_mask), None), ("synthetic: IRF/SRF/PED",
                                                               overlay(syn["dme"], syn["dme_fluid"]), None),
    ]
    fig, axes = plt.subplots(3, 4, figsize=(16, 11.5))
    for ax, (title, img, cmap) in zip(axes.ravel(), panels):
        if cmap == "tab20":
            ax.imshow(img, cmap=cmap, vmin=0, vmax=19, interpolation="nearest")
        elif cmap:
            ax.imshow(img, cmap=cmap, vmin=0, vmax=np.iinfo(img.dtype).max if img.dtype.kind == "u" else 1)
        else:
            ax.imshow(img)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle("mirage-edge synthetic OCT (mirage_edge.data.synth) vs real scans "
                 "(Duke DME: Chiu et al. 2015; MIRAGE example: Morano et al. 2025)", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)

    return out


__all__ = ["synthetic_vs_real"]
