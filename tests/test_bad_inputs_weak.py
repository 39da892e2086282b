"""Issue #22 item 5, the WEAK kinds: unusable output paths (a file, read-only, a full disk) give one line
naming the path and leave a partial output marked incomplete; impossible numbers are refused up front;
messages name the real cause; `predict` never mixes two runs in one --out and `--keep-going` writes every
good image. Root ignores permission bits, so read-only folders and full disks are simulated (monkeypatch)."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import one_line_error, run_without_torch
from mirage_edge._io import check_output_dir, output_errors
from mirage_edge.cli import cli
from mirage_edge.data.io import read_image, write_png
from mirage_edge.errors import CheckpointError, DataError, OutputError

ROFS = os.strerror(errno.EROFS)
FULL = f"the disk is full ({os.strerror(errno.ENOSPC)})"




def ok(*argv: str) -> str:
    res = CliRunner().invoke(cli, list(argv))
    assert res.exit_code == 0, res.output
    return res.output


def read_only(monkeypatch) -> None:
    """Make the write probe of `check_output_dir` fail as on a read-only mount (root ignores mode bits)."""
    def deny(*a, **k):
        raise PermissionError(errno.EROFS, ROFS)

    monkeypatch.setattr(tempfile, "TemporaryFile", deny)


def disk_full(monkeypatch, target: str = "fsync") -> None:
    """Every fsync (atomic writes) or Path.write_bytes (plain writes) fails as on a full disk."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if target == "fsync":
        monkeypatch.setattr(os, "fsync", full)
    else:
        monkeypatch.setattr(pathlib.Path, "write_bytes", full)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A tiny 3-class classifier exported to ONNX fp32 (one artifact, 2 validation inputs)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from mirage_edge.config import from_dict
    from mirage_edge.export import export_model
    from mirage_edge.export.target import ExportTarget

    class Tiny(torch.nn.Module):  # B x 1 x 32 x 32 -> B x 3
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3, stride=4, padding=1)
            self.head = torch.nn.Linear(8, 3)
            self.classes = ["grade_0", "grade_1", "grade_2"]
            self.input_size = (32, 32)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    target = from_dict(ExportTarget, {"formats": ["onnx"], "precisions": ["fp32"], "exporter": "torchscript",
                                      "validation": {"n_inputs": 2}})
    (d,) = export_model(Tiny().eval(), tmp_path_factory.mktemp("art") / "export", target)
    return d


@pytest.fixture()
def images(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    out = {f"good{i}": write_png(d / f"good{i}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
           for i in range(3)}
    out["text"] = d / "notes.png"
    out["text"].write_text("patient 12, left eye\nsee the report\n")
    out["random"] = d / "noise.png"
    out["random"].write_bytes(bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    return out


# -- 1: output paths that are a file, read-only or on a full disk ----------------------------------------
def test_check_output_dir_is_the_helper_for_every_command(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputError, match=f"^{re.escape(f'--out {afile} is a file, not a folder')}$") as err:
        check_output_dir(afile)
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOTDIR
    expected = f"run folder {afile / 'x'} cannot be created: {afile} is a file, not a folder"
    with pytest.raises(OutputError, match=f"^{re.escape(expected)}$"):
        check_output_dir(afile / "x", "run folder")
    assert check_output_dir(tmp_path / "new" / "dir").is_dir()
    read_only(monkeypatch)
    with pytest.raises(OutputError, match=f"^{re.escape(f'--out {tmp_path} is not writable: {ROFS}')}$"):
        check_output_dir(tmp_path)
    # a failed write under an output folder becomes one line naming the file; other errors pass
    target = tmp_path / "a.bin"
    with pytest.raises(OutputError, match=f"^{re.escape(f'cannot write {target}: {FULL}; note')}$"):
        with output_errors(tmp_path, "; note"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    with pytest.raises(FileNotFoundError):
        with output_errors(tmp_path):
            open(tmp_path / "missing-input")


def test_predict_out_unusable_and_full_disk(artifact, images, tmp_path, monkeypatch):
    afile = images["text"]
    good = str(images["good0"])
    assert one_line_error("predict", str(artifact), good, "--out", str(afile)) == (
        f"error: --out {afile} is a file, not a folder")
    assert one_line_error("predict", str(artifact), good, "--out", str(afile / "sub")) == (
        f"error: --out {afile / 'sub'} cannot be created: {afile} is a file, not a folder")
    with monkeypatch.context() as m:
        read_only(m)
        assert one_line_error("predict", str(artifact), good, "--out", str(tmp_path / "ro")) == (
            f"error: --out {tmp_path / 'ro'} is not writable: {ROFS}")
    out = tmp_path / "full"
    disk_full(monkeypatch)
    assert one_line_error("predict", str(artifact), good, "--out", str(out)) == (
        f"error: cannot write {out / 'predictions.csv'}: {FULL}; {out} is incomplete "
        "(it has no predictions.json)")
    assert not (out / "predictions.json").exists()  # the completion marker is written last


def test_data_synth_out_unusable_and_full_disk(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    synth = ["data", "synth", "--kind", "cls", "--n", "12", "--size", "32", "--out"]
    assert one_line_error(*synth, str(afile)) == f"error: output folder {afile} is a file, not a folder"
    assert one_line_error(*synth, str(afile / "d")) == (
        f"error: output folder {afile / 'd'} cannot be created: {afile} is a file, not a folder")
    with monkeypatch.context() as m:
        read_only(m)
        assert one_line_error(*synth, str(tmp_path / "ro")) == (
            f"error: output folder {tmp_path / 'ro'} is not writable: {ROFS}")
    out = tmp_path / "full"
    with monkeypatch.context() as m:
        disk_full(m, "write_bytes")
        line = one_line_error(*synth, str(out))
    assert line.startswith(f"error: cannot write {out / 'train'}") and line.endswith(
        f".png: {FULL}; {out} is incomplete (it has no SYNTH.json)")
    assert not (out / "SYNTH.json").exists()
    ok(*synth, str(out), "--overwrite")
    assert (out / "SYNTH.json").is_file()  # SYNTH.json marks a complete set


def _cls_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for c, v in (("healthy", 40), ("sick", 200)):
            for i in range(2):
                write_png(root / split / c / f"{c}{i}_{split}.png", np.full((32, 32), v + i, np.uint8))
    return root


def test_train_out_unusable_and_full_disk(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    data = str(_cls_folder(tmp_path / "data"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    ft = ["train", "finetune", "--task", "cls", "--data", data]
    fast = ["image_size=32", "loop.epochs=1", "loop.batch_size=2", "test=false", "loop.progress=false",
            "loop.threads=1"]
    assert one_line_error(*ft, "--out", str(afile), *fast) == f"error: --out {afile} is a file, not a folder"
    assert one_line_error("train", "pretrain", "--data", data, "--out", str(afile / "r")) == (
        f"error: --out {afile / 'r'} cannot be created: {afile} is a file, not a folder")
    with monkeypatch.context() as m:
        read_only(m)
        assert one_line_error(*ft, "--out", str(tmp_path / "ro"), *fast) == (
            f"error: --out {tmp_path / 'ro'} is not writable: {ROFS}")
    out = tmp_path / "run"
    disk_full(monkeypatch)  # the first checkpoint (written atomically, fsynced) hits the full disk
    line = one_line_error(*ft, "--out", str(out), *fast)
    assert line.startswith(f"error: cannot write {out}/") and f": {FULL}; the run in {out} is incomplete" in line
    assert "resume it with --resume auto" in line


def test_distill_out_that_is_a_file_is_one_line(tmp_path):
    """distill's own check lives in distill/ (it calls `_io.check_output_dir`); until then, and for any
    write the commands do not check, the CLI turns the OSError into one line naming the path."""
    pytest.importorskip("torch")
    from mirage_edge.data.synth import synthesize

    data = synthesize(tmp_path / "data", "layers", 3, size=32)
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_line_error("distill", "--recipe", "tiny-demo", "--data", str(data), "--image-size", "32",
                          "--out", str(afile / "run"))
    assert str(afile) in line and "is a file, not a folder" in line


# -- 2: impossible numbers, refused before any work ------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--threads", "-1"], "error: --threads must be >= 0 (0 = the engine's default), got -1"),
])
def test_predict_impossible_numbers(images, tmp_path, argv, expected):
    # refused before the artifact is even opened (it does not exist here)
    assert one_line_error("predict", str(tmp_path / "no-artifact"), str(images["good0"]), "--out",
                          str(tmp_path / "o"), *argv) == expected
    assert not (tmp_path / "o").exists()


def test_predictor_refuses_negative_threads(artifact):
    from mirage_edge.errors import ConfigError
    from mirage_edge.runtime import Predictor

    with pytest.raises(ConfigError, match=r"threads must be >= 0 \(0 = the engine's default\), got -2"):
        Predictor.load(artifact, threads=-2)


@pytest.mark.parametrize("splits, expected", [
    ("0.7,0.2,0.2", "0.7,0.2,0.2 (sum 1.1)"),
    ("0.5,0.5", "0.5,0.5"),
    ("0.8,0.3,-0.1", "0.8,0.3,-0.1"),
])
def test_synth_splits_must_sum_to_one(tmp_path, splits, expected):
    line = one_line_error("data", "synth", "--kind", "layers", "--n", "3", "--size", "32", "--splits", splits,
                          "--out", str(tmp_path / "s"))
    assert line == ("error: splits must be three non-negative fractions train,val,test that sum to 1, "
                    f"got {expected}")
    assert not (tmp_path / "s").exists()


def test_synth_negative_workers(tmp_path):
    assert one_line_error("data", "synth", "--kind", "layers", "--n", "3", "--workers", "-1",
                          "--out", str(tmp_path / "s")) == "error: workers must be >= 0 (0 = automatic), got -1"


@pytest.mark.parametrize("override, expected", [
    ("loop.batch_size=0", "loop.batch_size must be >= 1, got 0"),
    ("loop.threads=-1", "loop.threads must be >= 0, got -1"),
    ("image_size=100", "image_size 100 is not a multiple of the 32x32 patch of mirage-tiny; use e.g. 96 or 128"),
    ("image_size=16", "image_size 16 is not a multiple of the 32x32 patch of mirage-tiny; use e.g. 32"),
])
def test_train_impossible_numbers(tmp_path, override, expected):
    data = _cls_folder(tmp_path / "data")
    line = one_line_error("train", "finetune", "--task", "cls", "--data", str(data), "--out", str(tmp_path / "r"),
                          override)
    assert line.endswith(expected)
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


@pytest.mark.parametrize("override, expected", [
    ("stage2.batch_size=0", "stage2.batch_size must be > 0, got 0"),
    ("stage1.batch_size=-4", "stage1.batch_size must be > 0, got -4"),
    ("qat.batch_size=0", "qat.batch_size must be > 0, got 0"),
    ("run.threads=-1", "run.threads must be >= 0, got -1"),
    ("run.eval_batch_size=0", "run.eval_batch_size must be > 0, got 0"),
    ("stage1.lr=-0.1", "stage1.lr must be > 0, got -0.1"),
    ("stage2.epochs=-1", "stage2.epochs must be >= 0, got -1"),
    ("data.image_size=100", "data.image_size must be a multiple of 32 (student stride), got 100"),
])
def test_distill_impossible_numbers(override, expected):
    assert one_line_error("distill", "--recipe", "tiny-demo", "--print-config", override).endswith(expected)


# -- 3: messages that name the real cause ----------------------------------------------------------------
def test_text_or_noise_given_as_an_image(images):
    with pytest.raises(DataError, match=r"notes\.png: the content is text, not a PNG, TIFF, JPEG, BMP or \.npy"):
        read_image(images["text"])
    with pytest.raises(DataError, match=r"noise\.png: the content is not a PNG, TIFF, JPEG, BMP or \.npy file$"):
        read_image(images["random"])


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    pytest.importorskip("torch")
    from mirage_edge.models import create_model

    noise = bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8))
    assert noise[0] != 0x80 and noise[:2] != b"PK"
    not_ckpt = "is not a checkpoint: neither a PyTorch file (torch.save zip or pickle) nor safetensors"
    for name in ("noise.pth", "noise.safetensors", "noise.bin"):
        (tmp_path / name).write_bytes(noise)
        with pytest.raises(CheckpointError) as err:
            create_model("mirage", checkpoint=tmp_path / name)
        assert str(err.value) == f"{tmp_path / name} {not_ckpt}"
    assert one_line_error("info", "mirage", "--checkpoint", str(tmp_path / "noise.pth")) == (
        f"error: {tmp_path / 'noise.pth'} {not_ckpt}")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth is not a checkpoint: the file is empty"):
        create_model("mirage", checkpoint=tmp_path / "empty.pth")
    # a real safetensors file under a .pth name: said so, not "a refused pickle"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "weights.pth"))
    with pytest.raises(CheckpointError, match=r"weights\.pth is a safetensors file: name it \*\.safetensors"):
        create_model("mirage", checkpoint=tmp_path / "weights.pth")


def test_predict_on_what_is_not_an_artifact(artifact, images, tmp_path):
    good = str(images["good0"])

    def msg(path: Path) -> str:
        return one_line_error("predict", str(path), good, "--out", str(tmp_path / "o"))

    missing = tmp_path / "nothing-here"
    assert msg(missing) == f"error: artifact not found: {missing} does not exist"
    export = ("; export it first: mirage-edge export {src} --out DIR, then give DIR/<format>-<precision>")
    ckpt = tmp_path / "best"  # a training checkpoint folder (our format)
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"format": "mirage-edge"}))
    (ckpt / "model.safetensors").write_bytes(b"")
    assert msg(ckpt) == (f"error: {ckpt} is a training checkpoint, not an exported artifact"
                         + export.format(src=ckpt))
    run = tmp_path / "run"  # a train run folder
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    assert msg(run) == (f"error: {run} is a training run folder, not an exported artifact"
                        + export.format(src=run / "best"))
    pth = tmp_path / "teacher.pth"
    pth.write_bytes(b"PK\x03\x04")
    assert msg(pth) == f"error: {pth} is a checkpoint file, not an exported artifact" + export.format(src=pth)
    assert msg(artifact.parent) == (f"error: {artifact.parent} holds 1 artifact(s), it is not one itself: "
                                    f"give one of {artifact}")
    assert msg(artifact / "model.onnx") == (
        f"error: {artifact / 'model.onnx'} is a model file; give its artifact folder {artifact}")
    assert msg(images["good0"].parent) == (
        f"error: {images['good0'].parent} is not an artifact: it has neither metadata.json nor SHA256SUMS (an "
        "artifact folder holds the model file(s) and both, as `mirage-edge export` writes them)")


# -- 4: predict never mixes two runs; --keep-going ---------------------------------------------------------
def test_predict_refuses_a_non_empty_out_and_overwrite_replaces_cleanly(artifact, images, tmp_path):
    out = tmp_path / "out"
    g0, g1 = str(images["good0"]), str(images["good1"])
    ok("predict", str(artifact), g0, g1, "--out", str(out))
    assert one_line_error("predict", str(artifact), g0, "--out", str(out)) == (
        f"error: --out {out} is not empty (predictions.csv, predictions.json); pass --overwrite to replace the "
        "predictions there, or choose a new folder")
    write_png(out / "masks" / "old.png", np.zeros((4, 4), np.uint8))  # left by an earlier segmentation run
    ok("predict", str(artifact), g0, "--out", str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "predictions.json"]  # masks/ gone
    assert [r["file"] for r in json.loads((out / "predictions.json").read_text())["predictions"]] == [g0]
    assert len((out / "predictions.csv").read_text().splitlines()) == 2
    (out / "mine.txt").write_text("not ours")
    assert one_line_error("predict", str(artifact), g0, "--out", str(out), "--overwrite") == (
        f"error: --out {out} holds files that predict did not write (mine.txt); --overwrite replaces only an "
        "earlier predict output: choose a new folder")
    assert (out / "mine.txt").is_file() and (out / "predictions.json").is_file()


def test_predict_fails_fast_by_default_and_keep_going_lists_the_bad(artifact, images, tmp_path):
    argv = [str(images[k]) for k in ("good0", "text", "good1", "random", "good2")]
    line = one_line_error("predict", str(artifact), *argv, "--out", str(tmp_path / "ff"), "--batch-size", "2")
    assert line == (f"error: cannot read image {images['text']}: the content is text, not a PNG, TIFF, JPEG, "
                    "BMP or .npy file")
    assert not (tmp_path / "ff" / "predictions.json").exists()
    out = tmp_path / "kg"
    res = CliRunner().invoke(cli, ["predict", str(artifact), *argv, "--out", str(out), "--batch-size", "2",
                                   "--keep-going"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = res.output.splitlines()
    text, noise = images["text"], images["random"]
    assert (f"failed: {text}: cannot read image {text}: the content is text, not a PNG, TIFF, JPEG, BMP or .npy "
            "file") in lines
    assert (f"failed: {noise}: cannot read image {noise}: the content is not a PNG, TIFF, JPEG, BMP or .npy "
            "file") in lines
    assert lines[-1] == f"error: 2 of 5 image(s) failed (listed above); the 3 others are in {out}"
    summary = json.loads((out / "predictions.json").read_text())
    assert [r["file"] for r in summary["predictions"]] == [argv[0], argv[2], argv[4]]
    assert [f["file"] for f in summary["failed"]] == [argv[1], argv[3]]
    assert len((out / "predictions.csv").read_text().splitlines()) == 4


def test_keep_going_stays_torch_free(artifact, images, tmp_path):
    res = run_without_torch(
        """
        import sys
        from mirage_edge.cli import main
        try:
            main(sys.argv[1:])
        except SystemExit as e:
            print("exit", e.code)
        assert "torch" not in sys.modules
        """,
        "predict", str(artifact), str(images["good0"]), str(images["random"]), "--out", str(tmp_path / "o"),
        "--keep-going",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("exit 1") and "1 of 2 image(s) failed" in res.stderr
