"""Whole-volume prediction: the `predict_volume` API on models of known behaviour (exact numbers), and
`mirage-edge predict MODEL VOLUME` on a tiny exported ONNX model, torch-free, with its bad inputs."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SHARED, run_without_torch
from mirage_edge.data.io import read_image, write_png
from mirage_edge.data.synth_render import LAYER_CLASSES
from mirage_edge.data.volume import Volume, VoxelSize
from mirage_edge.errors import DataError, InputError, MeasurementError, VoxelSizeError
from mirage_edge.runtime.volume import RECORD_FILE, SCHEMA, SCHEMA_VERSION, predict_volume

VOXEL = VoxelSize(0.004, 0.01, 0.05)


class Threshold:
    """A fluid 'model': class 1 where the B-scan is brighter than 200, at the B-scan's own size."""

    task, classes, backend = "segmentation", ["Background", "Fluid"], "numpy"

    def predict(self, images):
        return np.stack([(np.asarray(im) > 200).astype(np.uint8) for im in images])


class Labels:
    """A layer 'model' that reads the class back from the grey value (label * 25), at half resolution
    (so the masks are resized back to the B-scan size)."""

    task, classes, backend = "segmentation", list(LAYER_CLASSES), "numpy"

    def predict(self, images):
        return np.stack([np.asarray(im)[::2, ::2] // 25 for im in images]).astype(np.uint8)


def _fluid_volume() -> np.ndarray:
    vol = np.full((21, 64, 100), 50, np.uint8)
    vol[5:15, 20:30, 30:60] = 255  # a fluid box of 10 x 10 x 30 voxels
    return vol


def _layered_volume(n: int = 41, h: int = 120, w: int = 400, fovea: tuple[int, int] = (23, 190)) -> np.ndarray:
    """Grey = 25 x class in 2 x 2 blocks (so `Labels`' half-resolution masks resize back exactly): vitreous,
    RNFL (20 rows, thinning to 0 at the fovea), GCL+IPL (16 rows), choroid, below the choroid."""
    hh, ww = h // 2, w // 2
    yy, xx = np.meshgrid(np.arange(n) * 0.05, (np.arange(ww) * 2 + 0.5) * 0.01, indexing="ij")
    dip = np.exp(-((yy - fovea[0] * 0.05) ** 2 + (xx - (fovea[1] + 0.5) * 0.01) ** 2) / (2 * 0.3 ** 2))
    rnfl = np.rint(10 * (1 - dip)).astype(int)[:, None, :]  # in half-resolution rows
    rows = np.arange(hh)[None, :, None]
    lab = np.zeros((n, hh, ww), np.uint8)
    top = 15
    lab[(rows >= top) & (rows < top + rnfl)] = 1
    lab[(rows >= top + rnfl) & (rows < top + rnfl + 8)] = 2
    lab[(rows >= top + rnfl + 8) & (rows < 45)] = 7
    lab[:, 45:] = 8
    return np.repeat(np.repeat(lab, 2, axis=1), 2, axis=2) * 25


def test_fluid_box_volume_through_the_api(tmp_path):
    seen = []
    res = predict_volume(Threshold(), Volume(_fluid_volume(), VOXEL), batch_size=4,
                         progress=lambda k, n: seen.append((k, n)))
    assert seen == [(4, 21), (8, 21), (12, 21), (16, 21), (20, 21), (21, 21)]
    assert res.masks.shape == (21, 64, 100) and res.masks.dtype == np.uint8 and res.valid.all()
    assert res.measured == ("fluid",) and res.thickness == {} and res.etdrs is None
    assert res.fluid["voxels"]["total"] == 3000
    assert res.fluid["volume_mm3"]["Fluid"] == pytest.approx(3000 * 0.004 * 0.01 * 0.05)
    assert res.areas_px[5].tolist() == [64 * 100 - 300, 300] and res.areas_px[0].tolist() == [6400, 0]
    assert res.areas_mm2()[5, 1] == pytest.approx(300 * 0.004 * 0.01)
    assert np.all(res.fluid_map[5:15, 30:60] == pytest.approx(40.0)) and res.fluid_map.sum() == pytest.approx(
        10 * 30 * 40.0)
    rec = res.save(tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert on_disk["schema"] == SCHEMA and on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["fluid"] == rec["fluid"] and on_disk["bscans"][5]["areas_px"] == {"Background": 6100, "Fluid": 300}
    assert len(on_disk["outputs"]["masks"]) == 21 and on_disk["outputs"]["maps"] == {"fluid": "maps/fluid.png"}
    assert np.array_equal(read_image(tmp_path / "out" / "masks" / "bscan_007.png"), res.masks[7])
    assert read_image(tmp_path / "out" / "maps" / "fluid.png").shape == (105, 100)  # 21 x 0.05 mm at 0.01 mm/px


def test_layer_thickness_fovea_and_etdrs_through_the_api():
    vol = _layered_volume()
    n = len(vol)
    # B-scan positions running up the localizer (B-scan 0 inferior), a right eye: quadrants are known
    positions = np.array([[[50.0, 500.0 - 5 * i], [450.0, 500.0 - 5 * i]] for i in range(n)])
    res = predict_volume(Labels(), Volume(vol, VOXEL, laterality="OD", positions=positions), batch_size=16)
    assert res.masks.shape == vol.shape and res.measured == ("layers",)
    assert set(res.thickness) == {"total_retina", "rnfl", "gcl_ipl", "inl_opl", "onl", "photoreceptors_elm_rpe",
                                  "rpe_bm", "choroid"}  # every layer of the model, absent ones at 0 µm
    assert res.thickness["onl"].max() == 0
    total = res.thickness["total_retina"]
    assert total[0, 0] == pytest.approx(36 * 4.0) and np.all(res.thickness["gcl_ipl"] == pytest.approx(64.0))
    assert total[23, 190] == pytest.approx(64.0)  # no RNFL at the fovea
    assert res.fovea_source == "thickness-minimum"
    assert abs(res.fovea[0] - 23) <= 1 and abs(res.fovea[1] - 190) <= 2
    means = res.etdrs["means"]["total_retina"]
    assert set(means) == {"central", "inner", "outer", *(f"{r}_{q}" for r in ("inner", "outer")
                                                         for q in ("superior", "nasal", "inferior", "temporal"))}
    assert means["central"] < means["inner"] < means["outer"] == pytest.approx(144.0)
    i, j = np.indices(total.shape)
    disc = np.hypot((i - res.fovea[0]) * 0.05, (j - res.fovea[1]) * 0.01) <= 0.5
    assert means["central"] == pytest.approx(float(total[disc].mean()), abs=1e-3)
    # 41 B-scans x 0.05 mm: 0.85 mm above the fovea, so the superior outer sector is not scanned at all
    assert means["outer_superior"] is None and res.etdrs["coverage"]["outer_superior"] == 0
    assert res.etdrs["coverage"]["central"] == pytest.approx(1.0, abs=0.05)
    rec = res.record()
    assert rec["thickness"]["fovea"]["source"] == "thickness-minimum"
    assert rec["class_roles"]["other"] == ["Choroid"] and rec["thickness"]["maps_um"]["gcl_ipl"]["mean"] == 64.0
    given = predict_volume(Labels(), Volume(vol, VOXEL), fovea=(10, 100))
    assert given.fovea == (10.0, 100.0) and given.fovea_source == "given"
    assert any("quadrants need the B-scan positions" in note for note in given.notes)


def test_measurements_that_do_not_fit_are_named_before_inference():
    class Exploding(Labels):
        def predict(self, images):
            raise AssertionError("inference ran")

    layers = Volume(_layered_volume(n=3), VOXEL)
    with pytest.raises(MeasurementError, match=r"--measure fluid: the model's classes .* have no fluid class.*"
                                               r"fits --measure layers"):
        predict_volume(Exploding(), layers, measure="fluid")
    with pytest.raises(MeasurementError, match=r"--measure layers: .*no retinal layer class.*fits --measure fluid"):
        predict_volume(Threshold(), layers, measure="layers")

    class Classifier(Threshold):
        task = "classification"

    with pytest.raises(MeasurementError, match="needs a segmentation model.*classification"):
        predict_volume(Classifier(), layers)
    with pytest.raises(VoxelSizeError, match=r"layers measurements need the voxel size.*--voxel-size AXIAL "
                                             r"LATERAL SPACING"):
        predict_volume(Exploding(), Volume(_layered_volume(n=3)))
    res = predict_volume(Labels(), Volume(_layered_volume(n=3)), measure="none")
    assert res.measured == () and res.areas_mm2() is None and res.record()["thickness"] is None
    assert predict_volume(Labels(), Volume(_layered_volume(n=3)), voxel_size=(0.004, 0.01, 0.05)).thickness
    with pytest.raises(InputError, match="--fovea 5.0 1.0 is outside the volume"):
        predict_volume(Labels(), layers, fovea=(5.0, 1.0))


def test_one_unreadable_bscan_is_reported_and_the_rest_measured(tmp_path):
    vol = _fluid_volume()
    for i, im in enumerate(vol):
        write_png(tmp_path / "scan" / f"b{i}.png", im)
    bad = tmp_path / "scan" / "b7.png"
    bad.write_bytes(bad.read_bytes()[:-30])  # truncated: no IEND
    with pytest.raises(DataError, match=r"b7\.png: truncated PNG"):
        predict_volume(Threshold(), tmp_path / "scan", voxel_size=VOXEL)
    res = predict_volume(Threshold(), tmp_path / "scan", voxel_size=VOXEL, keep_going=True)
    assert [f["name"] for f in res.failed] == ["b7"] and "truncated PNG" in res.failed[0]["error"]
    assert not res.valid[7] and res.valid.sum() == 20
    assert res.fluid["voxels"]["total"] == 2700  # the box minus B-scan 7's 300 voxels
    assert np.isnan(res.fluid_map[7]).all() and res.record()["bscans"][7]["valid"] is False


# ------------------------------------------------------------------------------- CLI, tiny ONNX model
@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A tiny exported segmentation artifact (ONNX fp32): 'Fluid' where the min-max scaled B-scan is
    above 0.5; exported as tests/test_runtime.py exports its models."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from torch import nn

    from mirage_edge.export import export_model
    from test_export_support import target

    class ThresholdSeg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_size = (64, 64)
            self.scale = nn.Parameter(torch.tensor(20.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x 1 x H x W -> B x 2 x H x W logits
            return torch.cat([(0.5 - x) * self.scale, (x - 0.5) * self.scale], 1)

    torch.set_num_threads(2)
    (art,) = export_model(ThresholdSeg().eval(), tmp_path_factory.mktemp("volume-artifact"),
                          target(formats=["onnx"], precisions=["fp32"], validation={"n_inputs": 2}),
                          task="segmentation", classes=["Background", "Fluid"])
    return art


def _cli(*args: str):
    from mirage_edge.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_cli_predicts_a_dicom_volume_without_torch(tmp_path, artifact):
    from test_volume_readers import DUKE, write_opt_dicom

    art = artifact
    if not DUKE.is_dir():
        pytest.skip(f"real B-scans not found at {DUKE}")
    bscans = np.stack([read_image(f) for f in sorted(DUKE.glob("subject09_*.png"))])
    dcm = write_opt_dicom(tmp_path / "scan.dcm", bscans, (0.0039, 0.0114, 0.12), "R")
    res = run_without_torch(
        """
        import sys
        from mirage_edge.cli import main
        try:
            main(sys.argv[1:])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        assert "torch" not in sys.modules
        """,
        "predict", str(art), str(dcm), "--out", str(tmp_path / "out"), "--batch-size", "4",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "11 B-scan(s) of" in res.stdout and "fluid" in res.stdout and "predicting 11 B-scans" in res.stderr
    rec = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert rec["input"]["sha256"] == hashlib.sha256(dcm.read_bytes()).hexdigest() and rec["input"]["format"] == "dicom"
    assert rec["model"]["artifact_sha256"] == hashlib.sha256((art / "SHA256SUMS").read_bytes()).hexdigest()
    assert rec["model"]["files_sha256"]["model.onnx"] == hashlib.sha256((art / "model.onnx").read_bytes()).hexdigest()
    assert rec["volume"]["voxel_size_mm"] == {"axial": 0.0039, "lateral": 0.0114, "spacing": 0.12}
    assert rec["volume"]["laterality"] == "OD" and rec["measured"] == ["fluid"]
    # the masks on disk are the API's, at the B-scan resolution; the fluid volume is their voxel count
    from mirage_edge.runtime import Predictor

    api = predict_volume(Predictor.load(art), dcm)
    masks = np.stack([read_image(tmp_path / "out" / m) for m in rec["outputs"]["masks"]])
    assert masks.shape == (11, 496, 768) and np.array_equal(masks, api.masks)
    assert rec["fluid"]["voxels"]["total"] == int(masks.sum()) > 0
    assert rec["fluid"]["volume_mm3"]["total"] == pytest.approx(masks.sum() * 0.0039 * 0.0114 * 0.12, rel=1e-5)
    assert (tmp_path / "out" / "maps" / "fluid.png").is_file()


def test_cli_volume_inputs_and_their_errors(tmp_path, artifact):
    art = artifact
    folder = tmp_path / "scan"
    for i, im in enumerate(_fluid_volume()):
        write_png(folder / f"b{i}.png", im)
    r = _cli("predict", str(art), str(folder), "--voxel-size", "0.004", "0.01", "0.05", "--out", str(tmp_path / "a"))
    assert r.exit_code == 2 and "--voxel-size apply to one OCT volume: add --volume" in r.output
    r = _cli("predict", str(art), str(folder), "--volume", "--out", str(tmp_path / "b"))
    assert r.exit_code == 2 and "need the voxel size" in r.output and "--voxel-size AXIAL LATERAL SPACING" in r.output
    r = _cli("predict", str(art), str(folder), "--volume", "--measure", "layers", "--voxel-size", "0.004", "0.01",
             "0.05", "--out", str(tmp_path / "c"))
    assert r.exit_code == 2 and "no retinal layer class" in r.output
    out = tmp_path / "ok"
    args = ["predict", str(art), str(folder), "--volume", "--voxel-size", "0.004", "0.01", "0.05", "--out", str(out)]
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / RECORD_FILE).read_text())
    assert rec["input"]["format"] == "image-folder" and len(rec["bscans"]) == 21 and rec["fluid"]["voxels"]["total"] > 0
    assert _cli(*args).exit_code != 0  # --out is not empty
    assert _cli(*args, "--overwrite").exit_code == 0
    # keep going past a truncated B-scan: measured, listed, exit status 1
    bad = folder / "b3.png"
    bad.write_bytes(bad.read_bytes()[:-30])
    r = _cli(*args[:-1], str(tmp_path / "kg"), "--keep-going")
    assert r.exit_code == 1 and "failed: B-scan 3 (b3)" in r.output and "1 of 21 B-scan(s) failed" in r.output
    assert json.loads((tmp_path / "kg" / RECORD_FILE).read_text())["failed"][0]["name"] == "b3"
    # B-scans of different sizes
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    (odd / "b3.png").unlink()
    write_png(odd / "b3.png", np.zeros((64, 99), np.uint8))
    r = _cli(*args[:2], str(odd), *args[3:-1], str(tmp_path / "d"))
    assert r.exit_code == 1 and "B-scans of different sizes" in r.output and "b3.png (64 x 99)" in r.output
    # an unknown file given as a volume
    (tmp_path / "x.bin").write_bytes(b"\x00" * 300)
    r = _cli("predict", str(art), str(tmp_path / "x.bin"), "--volume", "--out", str(tmp_path / "e"))
    assert r.exit_code == 1 and "x.bin: not an OCT volume format" in r.output


def test_cli_reads_a_heyex_vol(tmp_path, artifact):
    art = artifact
    vol = SHARED / "data" / "vendor" / "heyex_vol" / "test_volume.vol"
    if not vol.is_file():
        pytest.skip(f"eyepy's test volume not found at {vol}")
    pytest.importorskip("eyepy")
    r = _cli("predict", str(art), str(vol), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o" / RECORD_FILE).read_text())
    assert rec["input"]["format"] == "heyex-vol" and rec["volume"]["laterality"] == "OD"
    assert rec["volume"]["shape"] == [10, 40, 50] and len(rec["volume"]["bscan_positions_px"]) == 10
    assert rec["volume"]["voxel_size_mm"]["axial"] == pytest.approx(0.003872)
