"""Rendering of synthetic SD-OCT B-scans and SLO images with exact labels (numpy + OpenCV).

Model of one B-scan (all geometry in fractions of the image height H / width W, so any size works):

* Bruch's membrane (BM) is a smooth curve (offset, tilt, curvature, low-frequency undulation);
  the retinal layers are stacked above it with thickness profiles that depend on the lateral
  position: a foveal pit (inner layers vanish, ONL thickens), RNFL thicker on the nasal side, a
  parafoveal GCL shoulder; the choroid lies below BM.
* Pathologies are 3-D objects of a volume, cut by each slice: drusen and PED lift the RPE off
  BM, subretinal fluid (SRF) lifts the neurosensory retina off the RPE, intraretinal cysts (IRF)
  are dark ellipses that also thicken the retina; hard exudates are bright dots with shadows.
* Reflectivity (dB above the noise floor) per tissue, with sub-bands inside classes (GCL/IPL,
  INL/OPL, ELM / ellipsoid zone / interdigitation zone), choroidal vessels as a textured field,
  retinal-vessel shadows (the vessels come from the volume's SLO vessel tree), depth roll-off,
  lateral vignetting. Then: optical blur, multiplicative speckle (Gamma, `looks` = averaged
  frames), an additive noise floor with its own speckle, log compression and a device intensity
  curve (`CenterStyle`), quantised to 8 or 16 bit.

Layer classes (`LAYER_CLASSES`) are bands between consecutive boundaries; fluid masks
(`FLUID_CLASSES`) come from the same geometry, so labels are exact by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

LAYER_CLASSES = ("Background (above ILM)", "RNFL", "GCL+IPL", "INL+OPL", "ONL", "Photoreceptors (ELM-RPE)",
                 "RPE-BM", "Choroid", "Background (below choroid)")
FLUID_CLASSES = ("Background", "IRF", "SRF", "PED")
CLS_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")  # Kermany's classes, sorted like folder names


@dataclass(frozen=True)
class CenterStyle:
    """How one device/center renders a scan."""

    looks: float = 1.7             # speckle Gamma shape (frame averaging: larger = smoother)
    speckle_px: float = 0.6        # speckle grain (Gaussian sigma, pixels)
    psf: tuple[float, float] = (1.0, 1.6)  # optical blur sigma (axial, lateral), pixels at 512
    dynamic_db: float = 33.0       # dB mapped to the display range
    floor_db: float = -1.5         # display black level relative to the noise floor
    gamma: float = 1.0             # display curve exponent
    gain_db: float = 0.0           # tissue signal offset
    vignette_db: float = 5.0       # signal loss at the lateral edges
    rolloff_db: float = 6.0        # SD-OCT sensitivity roll-off over the depth range
    zero_wedge: float = 0.3        # probability of a black registration wedge at the top
    bit_depth: int = 8
    thickness: float = 1.0         # axial zoom of all tissue thicknesses


CENTERS: dict[str, CenterStyle] = {
    "default": CenterStyle(),
    "spectralis": CenterStyle(),
    "cirrus": CenterStyle(looks=1.6, speckle_px=1.0, psf=(1.1, 2.0), dynamic_db=30.0, floor_db=0.5, gamma=1.25,
                          vignette_db=3.0, rolloff_db=9.0, zero_wedge=0.0, thickness=0.9),
    "topcon": CenterStyle(looks=2.5, speckle_px=0.9, psf=(1.0, 1.6), dynamic_db=38.0, floor_db=-3.0, gamma=0.8,
                          gain_db=-2.0, vignette_db=8.0, rolloff_db=4.0, zero_wedge=0.0, thickness=1.1),
    "bioptigen": CenterStyle(looks=3.5, speckle_px=0.8, psf=(0.9, 1.4), dynamic_db=40.0, floor_db=-2.0, gamma=1.1,
                             vignette_db=4.0, rolloff_db=7.0, zero_wedge=0.0, bit_depth=16, thickness=1.0),
}


@dataclass
class Lesion:
    """A 3-D pathology: kind in {drusen, ped, srf, irf, exudate}; x/slice centre and half-extents."""

    kind: str
    x: float          # lateral centre (fraction of W)
    s: float          # slice centre (fraction of the volume, 0..1)
    rx: float         # lateral half-width (fraction of W)
    rs: float         # half-extent across slices (fraction of the volume)
    h: float          # height (fraction of H)
    depth: float = 0.5  # irf/exudate: relative depth inside the host layer band
    fibro: bool = False  # ped: fibrovascular (medium, heterogeneous) instead of serous (dark)

    def section(self, s: float) -> tuple[float, float] | None:
        """(half-width, height) of this lesion in slice position s, or None if not cut."""
        d = (s - self.s) / self.rs if self.rs > 0 else 0.0
        if abs(d) >= 1:
            return None
        f = np.sqrt(1 - d * d)
        return self.rx * f, self.h * f


@dataclass
class VolumeParams:
    """Per-volume anatomy; slices vary smoothly around it."""

    n_slices: int
    fovea_x: float
    fovea_s: float
    pit_sigma: float
    top: float                 # mean ILM depth (fraction of H)
    tilt: float
    curvature: float
    nasal_right: bool
    thick: dict[str, float]    # base thicknesses (fraction of H)
    undulation: np.ndarray     # (3, 3): amplitude, frequency, phase of BM waves
    lesions: list[Lesion] = field(default_factory=list)
    vessels_x: list[np.ndarray] = field(default_factory=list)  # per slice: vessel centres (fraction of W)
    vessels_w: list[np.ndarray] = field(default_factory=list)  # per slice: vessel widths (fraction of W)


def sample_volume(rng: np.random.Generator, n_slices: int, style: CenterStyle) -> VolumeParams:
    z = style.thickness * 0.92
    thick = {
        "rnfl": rng.uniform(0.022, 0.032) * z, "gcipl": rng.uniform(0.045, 0.058) * z,
        "inlopl": rng.uniform(0.042, 0.052) * z, "onl": rng.uniform(0.05, 0.064) * z,
        "pr": rng.uniform(0.034, 0.042) * z, "rpe": rng.uniform(0.017, 0.022) * z,
        "choroid": rng.uniform(0.085, 0.13) * z,
    }
    und = np.stack([rng.uniform(0.0, 0.005, 3), rng.uniform(0.5, 1.6, 3), rng.uniform(0, 2 * np.pi, 3)])
    return VolumeParams(
        n_slices=n_slices, fovea_x=rng.uniform(0.38, 0.62), fovea_s=rng.uniform(0.35, 0.65),
        pit_sigma=rng.uniform(0.045, 0.065), top=rng.uniform(0.17, 0.36), tilt=rng.uniform(-0.12, 0.12),
        curvature=rng.uniform(-0.03, 0.09), nasal_right=bool(rng.random() < 0.5), thick=thick, undulation=und,
    )


def _smooth_noise_1d(rng: np.random.Generator, n: int, scale: float, amp: float) -> np.ndarray:
    k = max(3, int(n * scale) | 1)
    v = rng.standard_normal(n + 2 * k).astype(np.float32)
    v = cv2.GaussianBlur(v[None], (0, 0), sigmaX=k / 3)[0, k:-k]
    return amp * v / (v.std() + 1e-6)


def _bump(x: np.ndarray, c: float, r: float) -> np.ndarray:
    """Smooth dome of unit height and half-width r (cosine-shaped, exact zero outside)."""
    if r <= 0:
        return np.zeros_like(x)
    d = np.clip(np.abs(x - c) / r, 0, 1)
    return (0.5 * (1 + np.cos(np.pi * d))).astype(np.float32)


def render_bscan(rng: np.random.Generator, vol: VolumeParams, slice_idx: int, size: tuple[int, int],
                 style: CenterStyle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one slice -> (image uint8/uint16 H x W, layer labels uint8 H x W, fluid labels uint8 H x W)."""
    H, W = size
    px = H / 512.0
    s = (slice_idx + 0.5) / vol.n_slices
    x = (np.arange(W, dtype=np.float32) + 0.5) / W
    Y = (np.arange(H, dtype=np.float32)[:, None] + 0.5) / H  # H x 1, broadcast against W

    # --- thickness profiles -------------------------------------------------------------------
    ds = (s - vol.fovea_s) / 0.18
    pit = np.exp(-0.5 * ds * ds) * np.exp(-0.5 * ((x - vol.fovea_x) / vol.pit_sigma) ** 2)
    shoulder = np.exp(-0.5 * ((np.abs(x - vol.fovea_x) - 2.2 * vol.pit_sigma) / vol.pit_sigma) ** 2)
    nasal = np.clip((x - vol.fovea_x) * (1 if vol.nasal_right else -1) / 0.5, -0.5, 1.0)
    t = vol.thick
    rnfl = t["rnfl"] * (1 + 0.9 * nasal) * (1 - 0.97 * pit) + _smooth_noise_1d(rng, W, 0.08, 0.002)
    gcipl = t["gcipl"] * (1 - 0.95 * pit) * (1 + 0.2 * shoulder)
    inlopl = t["inlopl"] * (1 - 0.8 * pit) * (1 + 0.1 * shoulder)
    onl = t["onl"] * (1 + 0.55 * pit)
    pr = t["pr"] * (1 + 0.15 * pit) + _smooth_noise_1d(rng, W, 0.1, 0.0008)
    rpe = np.full(W, t["rpe"], np.float32) + _smooth_noise_1d(rng, W, 0.05, 0.0008)
    choroid = t["choroid"] * (1 + _smooth_noise_1d(rng, W, 0.15, 0.12))

    # --- pathologies cut by this slice -----------------------------------------------------------
    rpe_lift = np.zeros(W, np.float32)   # drusen + PED: space between RPE band and BM
    ped_h = np.zeros(W, np.float32)
    srf_h = np.zeros(W, np.float32)
    swell = np.zeros(W, np.float32)      # retinal thickening from IRF
    cysts: list[tuple[float, float, float, float]] = []   # (x, rx, h, depth)
    exudates: list[tuple[float, float]] = []
    fibro = False
    for les in vol.lesions:
        sec = les.section(s)
        if sec is None:
            continue
        rx, h = sec
        if les.kind == "drusen":
            rpe_lift = np.maximum(rpe_lift, h * _bump(x, les.x, rx))
        elif les.kind == "ped":
            b = h * _bump(x, les.x, rx) ** 0.7
            ped_h = np.maximum(ped_h, b)
            fibro = fibro or les.fibro
        elif les.kind == "srf":
            srf_h = np.maximum(srf_h, h * _bump(x, les.x, rx) ** 0.8)
        elif les.kind == "irf":
            cysts.append((les.x, rx, h, les.depth))
            swell += 0.9 * h * _bump(x, les.x, rx * 2.5)
        elif les.kind == "exudate":
            exudates.append((les.x, les.depth))
    rpe_lift = np.maximum(rpe_lift, ped_h)
    drusen_only = rpe_lift > ped_h + 1e-6
    onl = onl + 0.55 * swell
    inlopl = inlopl + 0.45 * swell

    # --- boundaries (top to bottom), anchored at BM ----------------------------------------------
    xc = x - 0.5
    retina = rnfl + gcipl + inlopl + onl + pr + rpe
    wave = sum(vol.undulation[0, i] * np.sin(2 * np.pi * vol.undulation[1, i] * x + vol.undulation[2, i])
               for i in range(3))
    bm = (vol.top + float(np.mean(retina)) + vol.tilt * xc - vol.curvature * (2 * xc) ** 2 + wave
          + 0.004 * np.sin(2 * np.pi * s + vol.undulation[2, 0]))
    rpe_top = bm - rpe_lift - rpe
    pr_top = rpe_top - srf_h - pr
    onl_top = pr_top - onl
    inl_top = onl_top - inlopl
    gcl_top = inl_top - gcipl
    ilm = gcl_top - np.maximum(rnfl, 0.0015)
    csi = bm + choroid
    shift = max(0.0, 0.03 - float(ilm.min())) - max(0.0, float(csi.max()) - 0.93)
    bounds = np.stack([ilm, gcl_top, inl_top, onl_top, pr_top, rpe_top, bm, csi]).astype(np.float32) + shift
    bounds = np.maximum.accumulate(bounds, axis=0)
    layers = (Y[None] >= bounds[:, None, :]).sum(0).astype(np.uint8)  # 0..8, H x W

    # --- fluid labels ---------------------------------------------------------------------------
    fluid = np.zeros((H, W), np.uint8)
    ilm_b, gcl_b, inl_b, onl_b, pr_b, rpe_b, bm_b, csi_b = bounds
    if ped_h.any():
        space_top = bm_b - rpe_lift  # the lifted space between the RPE band and BM
        ped_mask = (Y >= space_top[None]) & (Y < bm_b[None]) & (ped_h > 1e-4)[None] & ~drusen_only[None]
        fluid[ped_mask] = 3
    if srf_h.any():
        fluid[(Y >= pr_b + pr) & (Y < rpe_b) & (srf_h > 1e-4)[None]] = 2
    X = x[None, :]
    cyst_mask = np.zeros((H, W), bool)
    cyst_rim = np.zeros((H, W), bool)  # cyst walls are slightly hyperreflective
    for cx, rx, h, depth in cysts:
        cy = inl_b + (pr_b - inl_b) * depth  # centre inside the INL..ONL band
        cyv = float(np.interp(cx, x, cy))
        ry = h / 2
        r2 = ((X - cx) / max(rx, 1e-4)) ** 2 + ((Y - cyv) / max(ry, 1e-4)) ** 2
        cyst_mask |= r2 <= 1.0
        cyst_rim |= r2 <= 1.5
    inside = (Y >= gcl_b[None]) & (Y < pr_b[None])
    cyst_mask &= inside
    cyst_rim &= inside & ~cyst_mask
    fluid[cyst_mask] = 1

    # --- reflectivity (dB above the noise floor) --------------------------------------------------
    lab = layers
    top_of = np.concatenate([np.full((1, W), -1.0, np.float32), bounds], 0)  # class k spans bounds[k-1]..bounds[k]
    bot_of = np.concatenate([bounds, np.full((1, W), 2.0, np.float32)], 0)
    tb = np.take_along_axis(top_of, lab.astype(np.int64), 0)
    bb = np.take_along_axis(bot_of, lab.astype(np.int64), 0)
    rel = np.clip((Y - tb) / np.maximum(bb - tb, 1e-4), 0, 1)  # relative depth inside the class band
    db = np.zeros((H, W), np.float32)
    db = np.where(lab == 1, 26.0 - 5 * rel, db)
    db = np.where(lab == 2, np.where(rel < 0.55, 16.0, 20.5), db)
    db = np.where(lab == 3, np.where(rel < 0.55, 9.5, 19.0), db)
    db = np.where(lab == 4, 6.5 + 2.5 * rel, db)
    prb = 10.0 + 6 * np.exp(-((rel - 0.15) / 0.06) ** 2) + 18 * np.exp(-((rel - 0.48) / 0.09) ** 2) \
        + 8 * np.exp(-((rel - 0.82) / 0.08) ** 2)
    db = np.where(lab == 5, prb, db)
    rpe_band = (Y < rpe_b[None] + rpe[None] * 1.0)
    db = np.where(lab == 6, np.where(rpe_band, 30.0, np.where(drusen_only[None], 19.0, 12.0)), db)
    # choroid: bright stroma with dark vessel lumens, larger vessels deeper (Sattler / Haller)
    tex = rng.standard_normal((H, W)).astype(np.float32)
    tex = cv2.GaussianBlur(tex, (0, 0), sigmaX=5 * px, sigmaY=2.5 * px)
    tex /= tex.std() + 1e-6
    lumen = np.clip((tex - 0.2) / 1.0, 0, 1)
    lumen = lumen * lumen * (3 - 2 * lumen)  # smoothstep: soft vessel walls
    fade = np.clip((rel - 0.8) / 0.2, 0, 1)  # the choroid-sclera interface is a little gradual
    db = np.where(lab == 7, (18.5 - 3 * rel - 6 * lumen * (0.4 + rel)) * (1 - 0.25 * fade), db)
    below = np.clip(Y - csi_b[None], 0, 1)
    db = np.where(lab == 8, 6.0 * np.exp(-below / 0.06) + 1.0, db)
    # lateral reflectivity changes per layer and a fine tissue texture
    xs = np.arange(W)
    lat = np.stack([_smooth_noise_1d(rng, W, 0.06, 1.3 if k < 7 else 0.7) for k in range(9)])
    db = db + lat[lab, xs[None, :]]
    fine = cv2.GaussianBlur(rng.standard_normal((H, W)).astype(np.float32), (0, 0), sigmaX=2.5 * px, sigmaY=1.0 * px)
    db = db + 1.6 * fine / (fine.std() + 1e-6)
    # fluid is hyporeflective; fibrovascular PED is medium and heterogeneous
    db = np.where(cyst_rim, db + 5.0, db)
    db = np.where(fluid == 1, 1.0, db)
    db = np.where(fluid == 2, 1.5, db)
    if fibro:
        db = np.where(fluid == 3, 14.0 + 4 * np.clip(tex, -1, 1), db)
    else:
        db = np.where(fluid == 3, 2.5, db)
    for ex_x, ex_d in exudates:  # bright dots in the OPL with a shadow below
        cy = float(np.interp(ex_x, x, inl_b + (onl_b - inl_b) * ex_d))
        r = 0.006
        dot = ((X - ex_x) / r) ** 2 + ((Y - cy) / (r * 0.8)) ** 2 <= 1
        db = np.where(dot, 29.0, db)
        db = db - np.where((Y > cy) & (np.abs(X - ex_x) < r), 4.0, 0.0)
    # retinal vessels: small bright vessel in the RNFL/GCL, shadow in everything below
    if vol.vessels_x and slice_idx < len(vol.vessels_x):
        vxs, vws = vol.vessels_x[slice_idx], vol.vessels_w[slice_idx]
        for j in np.argsort(-vws)[:6]:  # the larger vessels cast visible shadows
            vx, vw = float(vxs[j]), float(vws[j])
            col = np.abs(x - vx) < vw / 2
            if not col.any() or vw < 0.006:
                continue
            vy = float(np.interp(vx, x, gcl_b))
            prof = (1 - (np.abs(x - vx) / (vw / 2)) ** 2) * col
            wall = (np.abs(Y - vy) < vw * 0.5) & col[None]
            db = np.where(wall, db + 3.0 * prof[None], db)
            shadow = (Y > vy + vw * 0.5) & col[None] & (lab > 0)
            db = db - np.where(shadow, 5.0 * prof[None], 0.0)
    db = db + style.gain_db - style.rolloff_db * Y - style.vignette_db * (2 * X - 1) ** 2 \
        + _smooth_noise_1d(rng, W, 0.05, 0.8)[None]
    db = np.where(lab == 0, -40.0, db)  # vitreous: noise floor only

    # --- image formation --------------------------------------------------------------------------
    sig = np.power(10.0, db / 10.0, dtype=np.float32)
    sig = cv2.GaussianBlur(sig, (0, 0), sigmaX=style.psf[1] * px, sigmaY=style.psf[0] * px)
    # A pixel of a smaller image covers more speckle grains: average them (as down-sampling would).
    looks = style.looks * max(1.0, 512.0 / H)
    sp = rng.standard_gamma(looks, size=(H, W), dtype=np.float32) / looks
    sp = cv2.GaussianBlur(sp, (0, 0), sigmaX=style.speckle_px * 1.3, sigmaY=style.speckle_px)
    sp /= sp.mean()
    noise_looks = max(1.0, 512.0 / H)
    noise = rng.standard_gamma(noise_looks, size=(H, W), dtype=np.float32) / noise_looks
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=style.speckle_px * 1.3, sigmaY=style.speckle_px)
    inten = sig * sp + noise
    disp = (10.0 * np.log10(inten + 1e-6) - style.floor_db) / style.dynamic_db
    disp = np.clip(disp, 0.0, 1.0) ** style.gamma
    if style.zero_wedge and rng.random() < style.zero_wedge:
        depth = float(bounds[0].min()) * rng.uniform(0.2, 0.7)
        left = rng.random() < 0.5
        edge = depth * ((1 - x) if left else x) ** 2
        disp = np.where(Y < edge[None], 0.0, disp)
    full = 65535.0 if style.bit_depth == 16 else 255.0
    img = np.rint(disp * full).astype(np.uint16 if style.bit_depth == 16 else np.uint8)
    return img, layers, fluid


# --- SLO ------------------------------------------------------------------------------------------
def _vessel_tree(rng: np.random.Generator, size: int, disc: tuple[float, float], fovea: tuple[float, float],
                 nasal_right: bool) -> list[tuple[np.ndarray, float]]:
    """Polylines (N x 2 pixel coords) with widths: two arcades leave the disc vertically and bend
    around the macula toward the temporal side; side branches; short nasal vessels; the foveal
    avascular zone stays free."""
    out: list[tuple[np.ndarray, float]] = []
    fv = np.array(fovea) * size
    toward = float(np.arctan2(fv[1] - disc[1] * size, fv[0] - disc[0] * size))

    def grow(p: np.ndarray, ang: float, target: float, pull: float, width: float, length: float,
             depth: int) -> None:
        pts = [p.copy()]
        n = max(4, int(length / 4))
        step = length / n
        for i in range(n):
            ang += pull * (target - ang) + rng.normal(0, 0.05)
            p = p + step * np.array([np.cos(ang), np.sin(ang)])
            if np.hypot(*(p - fv)) < 0.07 * size:
                break
            pts.append(p.copy())
            if depth < 2 and i > 3 and rng.random() < 0.07:
                side = 1 if rng.random() < 0.5 else -1
                child = ang + side * rng.uniform(0.5, 1.0)
                grow(p, child, child, 0.0, width * 0.65, length * rng.uniform(0.25, 0.45), depth + 1)
        if len(pts) > 1:
            out.append((np.array(pts), width))

    d = np.array(disc) * size
    for sign in (-1, 1):
        grow(d, toward + sign * rng.uniform(1.2, 1.45), toward + sign * rng.uniform(0.35, 0.55), 0.05,
             size * 0.011, size * rng.uniform(0.85, 1.0), 0)
        for _ in range(2):
            a0 = toward + np.pi + sign * rng.uniform(0.3, 1.0)
            grow(d, a0, a0, 0.0, size * 0.008, size * rng.uniform(0.2, 0.35), 1)
    return out


def render_slo(rng: np.random.Generator, vol: VolumeParams, size: int, field: tuple[float, float, float, float],
               ) -> tuple[np.ndarray, np.ndarray]:
    """SLO-like en-face image (uint8 size x size) and its vessel mask (float32 0..1).

    `field` = (x0, x1, y0, y1): the OCT raster inside the SLO (fractions); the B-scan of slice s
    runs along row y0 + s*(y1-y0) from x0 to x1.
    """
    x0, x1, y0, y1 = field
    fov = (x0 + (x1 - x0) * vol.fovea_x, y0 + (y1 - y0) * vol.fovea_s)
    disc = (fov[0] + (0.36 if vol.nasal_right else -0.36), fov[1] - 0.03)
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    X, Y = np.meshgrid(g, g)
    base = 0.42 + 0.05 * rng.standard_normal()
    illum = base * (1 - 0.55 * ((X - 0.5) ** 2 + (Y - 0.5) ** 2) * 2)
    tex = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), size / 60)
    tex /= tex.std() + 1e-6
    img = illum * (1 + 0.06 * tex) - 0.08 * np.exp(-((X - fov[0]) ** 2 + (Y - fov[1]) ** 2) / (2 * 0.06 ** 2))
    dr = ((X - disc[0]) / 0.055) ** 2 + ((Y - disc[1]) / 0.065) ** 2
    img = img + 0.3 * np.exp(-dr ** 3) + 0.12 * np.exp(-dr * 3)
    vmask = np.zeros((size, size), np.float32)
    for pts, w in _vessel_tree(rng, size, disc, fov, vol.nasal_right):
        cv2.polylines(vmask, [np.round(pts * 16).astype(np.int32)], False, 1.0,
                      thickness=max(1, int(round(w))), lineType=cv2.LINE_AA, shift=4)
    vmask = cv2.GaussianBlur(vmask, (0, 0), 0.6)
    img = img * (1 - 0.3 * np.clip(vmask, 0, 1))
    img = img * (1 + 0.025 * rng.standard_normal((size, 1)).astype(np.float32))  # line-scan banding
    img = img * rng.gamma(8.0, 1 / 8.0, size=(size, size)).astype(np.float32) ** 0.3
    img = cv2.GaussianBlur(img, (0, 0), 0.5)
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8), vmask


def scan_line(img: np.ndarray, field: tuple[float, float, float, float], s: float) -> np.ndarray:
    """Copy of the SLO with the B-scan position drawn as a bright line (as devices show it)."""
    out = img.copy()
    n = img.shape[0]
    x0, x1, y0, y1 = field
    row = int(round((y0 + s * (y1 - y0)) * n))
    cv2.line(out, (int(x0 * n), row), (int(x1 * n), row), 255, max(1, n // 256))
    return out


def vessels_along_rows(vmask: np.ndarray, field: tuple[float, float, float, float], n_slices: int,
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Vessel crossings of each slice's scan line: centres and widths as fractions of the B-scan width."""
    n = vmask.shape[0]
    x0, x1, y0, y1 = field
    cols = slice(int(x0 * n), int(x1 * n))
    xs, ws = [], []
    for i in range(n_slices):
        s = (i + 0.5) / n_slices
        row = vmask[min(n - 1, int((y0 + s * (y1 - y0)) * n)), cols] > 0.3
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        starts, stops = edges[0::2], edges[1::2]
        width = max(1, row.size)
        xs.append(((starts + stops) / 2 / width).astype(np.float32))
        ws.append(np.clip((stops - starts) / width, 0.004, 0.025).astype(np.float32))
    return xs, ws


__all__ = ["LAYER_CLASSES", "FLUID_CLASSES", "CLS_CLASSES", "CenterStyle", "CENTERS", "Lesion", "VolumeParams",
           "sample_volume", "render_bscan", "render_slo", "scan_line", "vessels_along_rows"]
