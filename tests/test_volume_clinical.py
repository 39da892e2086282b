"""Clinical numbers on synthetic volumes of known geometry: constant-thickness layers, a fluid box of known
volume, a fovea at a known place, ETDRS regions checked against eyepy's grid."""
from __future__ import annotations

import numpy as np
import pytest

from mirage_edge.data.synth_render import FLUID_CLASSES, LAYER_CLASSES
from mirage_edge.data.volume import VoxelSize
from mirage_edge.errors import VoxelSizeError
from mirage_edge.runtime import clinical
from mirage_edge.runtime.clinical import TOTAL, class_roles

LAYERS = ["Background", "RNFL", "GCL+IPL", "Choroid"]
VOXEL = VoxelSize(0.004, 0.01, 0.1)  # 4 µm rows, 10 µm A-scans, 100 µm between B-scans


def test_class_roles_from_benchmark_names():
    r = class_roles(LAYER_CLASSES)
    assert [LAYER_CLASSES[i] for i in r.background] == ["Background (above ILM)", "Background (below choroid)"]
    assert [LAYER_CLASSES[i] for i in r.other] == ["Choroid"]
    assert len(r.layers) == 6 and not r.fluid
    r = class_roles(FLUID_CLASSES)
    assert r.background == (0,) and r.fluid == (1, 2, 3) and not r.layers
    assert class_roles(["Background", "Fluid"]).fluid == (1,)
    aroi = ["Above ILM", "ILM-IPL/INL", "IPL/INL-RPE", "RPE-BM", "Under BM", "Cyst", "PED", "SRF"]
    r = class_roles(aroi)
    assert r.background == (0, 4) and r.layers == (1, 2, 3) and r.fluid == (5, 6, 7)
    duke_iamd = ["Invalid", "Above ILM", "ILM–inner RPEDC", "inner RPEDC–outer BM", "below BM"]
    assert class_roles(duke_iamd).layers == (2, 3) and class_roles(duke_iamd).background == (0, 1, 4)
    assert class_roles(["Elsewhere", "RNFL", "GCIPL", "Choroid"]).layers == (1, 2)


def _layered(n: int = 61, h: int = 100, w: int = 600) -> np.ndarray:
    """N x H x W masks: RNFL rows 10-29 (20 px), GCL+IPL rows 30-44 (15 px), choroid 45-59."""
    m = np.zeros((n, h, w), np.uint8)
    m[:, 10:30], m[:, 30:45], m[:, 45:60] = 1, 2, 3
    return m


def test_constant_thickness_layers_give_that_thickness_everywhere():
    masks = _layered()
    maps = clinical.thickness_maps(masks, LAYERS, class_roles(LAYERS), VOXEL.axial)
    assert set(maps) == {TOTAL, "rnfl", "gcl_ipl", "choroid"}
    assert maps["rnfl"].shape == (61, 600)
    assert np.all(maps["rnfl"] == pytest.approx(80.0)) and np.all(maps["gcl_ipl"] == pytest.approx(60.0))
    assert np.all(maps[TOTAL] == pytest.approx(140.0))  # RNFL + GCL+IPL; the choroid is not retina
    assert np.all(maps["choroid"] == pytest.approx(60.0))
    # 61 B-scans 0.1 mm apart x 600 A-scans of 10 µm: 6 x 6 mm, the whole ETDRS grid around the centre
    e = clinical.etdrs_means(maps, VOXEL, (30, 300))
    assert e["radii_mm"] == [0.5, 1.5, 3.0]
    assert all(v == pytest.approx(140.0) for v in e["means"][TOTAL].values())
    assert all(v == pytest.approx(80.0) for v in e["means"]["rnfl"].values())
    assert all(c > 0.95 for c in e["coverage"].values()), e["coverage"]
    assert set(e["means"][TOTAL]) == {"central", "inner", "outer"}  # no orientation: rings only


def test_total_thickness_spans_fluid_and_gaps_and_is_nan_without_retina():
    classes = ["Background", "Layer", "Fluid"]
    m = np.zeros((2, 50, 4), np.uint8)
    m[:, 10:30, :3] = 1
    m[:, 15:20, 0] = 2      # fluid inside the layer: still retina
    m[:, 22:24, 1] = 0      # a missed pixel run: the span still counts it
    maps = clinical.thickness_maps(m, classes, class_roles(classes), 0.005)
    assert maps[TOTAL][0, :3] == pytest.approx([100.0, 100.0, 100.0])
    assert np.isnan(maps[TOTAL][:, 3]).all()                       # no retina in A-scan 3
    assert maps["layer"][0, :4] == pytest.approx([75.0, 90.0, 100.0, 0.0])
    valid = np.array([True, False])
    maps = clinical.thickness_maps(m, classes, class_roles(classes), 0.005, valid)
    assert np.isnan(maps[TOTAL][1]).all() and np.isnan(maps["layer"][1]).all()


def test_fluid_box_gives_its_volume_and_enface_footprint():
    classes = ["Background", "IRF", "SRF"]
    m = np.zeros((21, 64, 100), np.uint8)
    m[5:15, 20:30, 30:60] = 1           # 10 B-scans x 10 rows x 30 A-scans
    m[2:4, 40:45, 0:10] = 2             # 2 x 5 x 10
    f, enface = clinical.fluid_measures(m, classes, class_roles(classes), VOXEL)
    voxel_mm3 = 0.004 * 0.01 * 0.1
    assert f["voxels"] == {"IRF": 3000, "SRF": 100, "total": 3100}
    assert f["volume_mm3"]["IRF"] == pytest.approx(3000 * voxel_mm3) and f["volume_mm3"]["total"] == pytest.approx(
        3100 * voxel_mm3)
    assert enface.shape == (21, 100)
    assert np.all(enface[5:15, 30:60] == pytest.approx(40.0)) and np.all(enface[2:4, 0:10] == pytest.approx(20.0))
    assert enface.sum() == pytest.approx(10 * 30 * 40.0 + 2 * 10 * 20.0)
    assert f["area_mm2_max_bscan"] == pytest.approx(10 * 30 * 0.004 * 0.01)
    f1, _ = clinical.fluid_measures(m[:1], classes, class_roles(classes), VoxelSize(0.004, 0.01))
    assert f1["volume_mm3"] is None  # one B-scan, no spacing: no volume


def test_fovea_found_at_the_thickness_minimum():
    n, w = 49, 512
    voxel = VoxelSize(0.004, 0.0117, 0.125)
    yy, xx = np.meshgrid(np.arange(n) * voxel.spacing, np.arange(w) * voxel.lateral, indexing="ij")
    cy, cx = 27 * voxel.spacing, 230 * voxel.lateral
    total = 320 - 90 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.4 ** 2))
    total[:, :20] = 150  # thin scan edge outside the central half: not the fovea
    total[3, 100] = np.nan
    assert clinical.find_fovea(total.astype(np.float32), voxel) == (27.0, 230.0)
    assert clinical.find_fovea(np.full((n, w), np.nan, np.float32), voxel) is None


def test_etdrs_needs_spacing_and_reports_partial_coverage():
    maps = {TOTAL: np.full((1, 600), 250.0, np.float32)}
    with pytest.raises(VoxelSizeError, match="at least 2 B-scans"):
        clinical.etdrs_means(maps, VoxelSize(0.004, 0.01), (0, 300))
    # a 3 mm wide, 2 mm high scan: the central disc inside, the outer ring only partly
    maps = {TOTAL: np.full((21, 300), 250.0, np.float32)}
    e = clinical.etdrs_means(maps, VOXEL, (10, 150))
    assert e["coverage"]["central"] > 0.95 and e["coverage"]["outer"] < 0.3
    assert e["means"][TOTAL]["outer"] == pytest.approx(250.0)


@pytest.mark.parametrize("laterality", ["OD", "OS"])
def test_etdrs_regions_match_eyepy_grid(laterality):
    """On square en-face pixels our mm-based ETDRS masks equal eyepy's `grids.grid` (rings and nasal /
    temporal / superior / inferior quadrants); the en-face map here is in image orientation (row down =
    inferior, column right), i.e. B-scan positions running downwards on the localizer."""
    grids = pytest.importorskip("eyepy.core.grids")
    n, s = 220, 0.0301  # 0.0301 mm pixels: no pixel centre falls exactly on a circle
    eye = grids.grid((n, n), (0.5, 1.5, 3.0), laterality, n_sectors=(1, 4, 4), rotation=(0, 45, 45), radii_scale=s)
    # eyepy flips the OD grid left-right for OS, which moves an even-sized grid's centre one column
    centre = (n // 2, n // 2 if laterality == "OD" else n - 1 - n // 2)
    positions = np.array([[[0.0, float(i)], [n - 1.0, float(i)]] for i in range(n)])  # B-scan i at row i
    orient = clinical.orientation(positions, laterality)
    assert orient == (-1, 1, "right" if laterality == "OD" else "left")
    ours = clinical.etdrs_regions((n, n), VoxelSize(0.004, s, s), centre, orient)
    # eyepy's sectors start at 45° from the nasal horizontal, counter-clockwise on the image of an OD eye
    quadrants = ("superior", "temporal", "inferior", "nasal")
    pairs = [("central", "Radius: 0-0.5 Sector: 0")] + [
        (f"{ring}_{q}", f"Radius: {a}-{b} Sector: {k}") for ring, a, b in (("inner", 0.5, 1.5), ("outer", 1.5, 3.0))
        for k, q in enumerate(quadrants)]
    # a pixel exactly on a 45° diagonal is a tie between two quadrants: eyepy's mirrored OS grid gives it
    # to the other one
    rows, cols = np.indices((n, n))
    off_diagonal = np.abs(rows - centre[0]) != np.abs(cols - centre[1])
    for mine, theirs in pairs:
        assert np.array_equal(ours[mine][off_diagonal], (eye[theirs] > 0.5)[off_diagonal]), (mine, theirs)
    if laterality == "OD":
        for mine, theirs in pairs:
            assert np.array_equal(ours[mine], eye[theirs] > 0.5), (mine, theirs)
    rng = np.random.default_rng(0)
    m = rng.normal(300, 20, (n, n)).astype(np.float32)
    e = clinical.etdrs_means({TOTAL: m}, VoxelSize(0.004, s, s), centre, orient)
    rings = {"central": ["Radius: 0-0.5 Sector: 0"], "inner": [f"Radius: 0.5-1.5 Sector: {k}" for k in range(4)],
             "outer": [f"Radius: 1.5-3.0 Sector: {k}" for k in range(4)]}
    for ring, names in rings.items():
        region = np.any([eye[k] > 0.5 for k in names], axis=0)
        assert e["means"][TOTAL][ring] == pytest.approx(float(m[region].mean()), abs=1e-3)


def test_orientation_needs_positions_and_laterality():
    pos = np.array([[[0.0, 10.0], [5.0, 10.0]], [[0.0, 8.0], [5.0, 8.0]]])  # B-scan 1 above B-scan 0
    assert clinical.orientation(pos, "OD") == (1, 1, "right")
    assert clinical.orientation(pos[:, ::-1], "OS") == (1, -1, "left")
    assert clinical.orientation(pos, None) is None and clinical.orientation(None, "OD") is None


def test_render_map_square_pixels_orientation_and_grid():
    import cv2

    lo, hi = cv2.applyColorMap(np.array([[0], [255]], np.uint8), cv2.COLORMAP_TURBO)[:, 0]
    m = np.zeros((61, 600), np.float32)
    m[0] = 100  # B-scan 0 at the map's max
    plain = clinical.render_map(m, VOXEL)
    assert plain.shape == (610, 600, 3) and plain.dtype == np.uint8  # rows stretched to 10 µm, as the A-scans
    assert (plain[:10, 5] == hi).all() and (plain[10:, 5] == lo).all()  # B-scan 0 on top without orientation
    # B-scan index rising towards superior: B-scan 0 is the lowest row
    up = clinical.render_map(m, VOXEL, orient=(1, 1, "right"))
    assert (up[-10:, 5] == hi).all() and (up[:-10, 5] == lo).all()
    grid = clinical.render_map(m, VOXEL, center=(30, 300))
    white = np.argwhere((grid > 200).all(axis=-1))
    r = np.hypot(white[:, 0] - 305, white[:, 1] - 300.5) * 0.01  # mm from the centre
    assert len(white) > 100 and all(np.isclose(r, R, atol=0.03).any() for R in (0.5, 1.5, 3.0))
    assert np.all(np.min(np.abs(r[:, None] - np.array([0.5, 1.5, 3.0])), axis=1) < 0.03)
    nan_map = np.full((3, 4), np.nan, np.float32)
    assert (clinical.render_map(nan_map, VoxelSize(0.004, 0.01)) == 128).all()
