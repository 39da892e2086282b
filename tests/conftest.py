"""Shared test fixtures: paths into ../shared and a torch-blocking subprocess helper."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MIRAGE_EDGE_SHARED", ROOT.parent / "shared"))
MIRAGE_REF = SHARED / "fixtures" / "mirage_ref"
REAL_DATA = SHARED / "data" / "real"
EXAMPLE_DATA = SHARED / "data" / "mirage_example"



def _cpu_has_int8_dot_product() -> bool:
    """False only on an x86 CPU without VNNI (AVX-512 VNNI, AVX-VNNI) or AMX: there (AVX2, e.g. AMD Zen 3) the
    u8 x s8 pairs of an INT8 dot product saturate a 16-bit sum (OpenVINO's "saturation issue"), so INT8 parity
    with PyTorch is looser than these tests' bounds. ARM and unknown CPUs: True."""
    from mirage_edge.bench.hardware import _X86_FLAGS, _cpuinfo

    _, flags, _ = _cpuinfo(Path("/"))
    x86 = any(f in _X86_FLAGS for f in flags)
    return not x86 or any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


# INT8-parity tests whose bounds hold only where integer dot products do not saturate
requires_vnni = pytest.mark.skipif(
    not _cpu_has_int8_dot_product(),
    reason="CPU without VNNI/AMX: INT8 u8 x s8 dot products saturate (AVX2), INT8 parity bounds do not apply")

# Prepended to a child interpreter's code: any attempt to import torch fails loudly.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def run_without_torch(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing torch raises ImportError."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *args],
        capture_output=True, text=True, cwd=cwd or ROOT, timeout=300,
    )


def tiny_seg_teacher(root: Path, n: int = 12) -> tuple[Path, Path]:
    """A synthetic layers set (64 px, `n` B-scans) under root/layers and a 'fine-tuned' (random)
    mirage-tiny segmentation teacher at root/teacher: what the distillation tests run on."""
    import torch

    from mirage_edge.data.synth import synthesize
    from mirage_edge.models import create_model, save_model
    from mirage_edge.models.task import segmentation_model

    data = synthesize(root / "layers", "layers", n, seed=0, size=64)
    torch.manual_seed(0)
    enc = create_model("mirage-tiny", input_size=64, depth=1, in_domains=["bscan"], out_domains=[])
    save_model(segmentation_model(enc, 9, class_dim=16, depth=1), root / "teacher")
    return data, root / "teacher"


def one_line_error(*argv: str) -> str:
    """Run `mirage-edge ARGV` in-process; expect a clean failure: one 'error:' line, no traceback."""
    from click.testing import CliRunner

    from mirage_edge.cli import cli

    res = CliRunner().invoke(cli, list(argv))
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


@pytest.fixture(autouse=True, scope="session")
def _private_home(tmp_path_factory):
    """Tests never write into the user's ~/.cache/mirage-edge (file-hash records, default caches):
    MIRAGE_EDGE_HOME points at a session folder unless the caller set it."""
    if "MIRAGE_EDGE_HOME" in os.environ:
        yield
        return
    os.environ["MIRAGE_EDGE_HOME"] = str(tmp_path_factory.mktemp("mirage-edge-home"))
    try:
        yield
    finally:
        os.environ.pop("MIRAGE_EDGE_HOME", None)


_CLI_NO_TORCH = """
import sys
from mirage_edge.cli import main
sys.argv = ["mirage-edge", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert e.code in (0, None), e.code
assert "torch" not in sys.modules, "the command imported torch"
"""


def cli_without_torch(*argv: str) -> subprocess.CompletedProcess:
    """`mirage-edge ARGV` in a fresh interpreter where torch cannot be imported; the child fails (non-zero
    return code) when the command exits non-zero or imports torch anyway."""
    return run_without_torch(_CLI_NO_TORCH, *argv)


@pytest.fixture(scope="session")
def mirage_ref() -> Path:
    if not MIRAGE_REF.is_dir():
        pytest.skip(f"official MIRAGE fixtures not found at {MIRAGE_REF}")
    return MIRAGE_REF


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def example_data() -> Path:
    if not EXAMPLE_DATA.is_dir():
        pytest.skip(f"MIRAGE example triplet not found at {EXAMPLE_DATA}")
    return EXAMPLE_DATA
