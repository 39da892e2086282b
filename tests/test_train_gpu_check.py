"""benchmarks/gpu/check.sh: the CPU-sized `--smoke` variant runs end to end (the full run needs an H100)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "check.sh"


def test_check_script_is_executable_and_documents_itself():
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--smoke" in out.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.slow
def test_check_smoke_runs_and_reports(tmp_path):
    pytest.importorskip("torch")
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    env = dict(os.environ, PYTHON=sys.executable, WORK_DIR=str(tmp_path / "work"), OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith(("pretrain ", "seg ", "distill/stage"))]
    assert len(lines) == 4 and all("images/s" in x and "peak GPU mem" in x for x in lines)
    assert all("falls" in x for x in lines[:3])
    # the distillation ran under torchrun: 2 processes, both computing teacher targets for the cache
    assert any(x.startswith("distill ") and "2 process(es)" in x and "on 2 process(es)" in x
               for x in proc.stdout.splitlines())
    assert (tmp_path / "work" / "seg" / "best" / "model.safetensors").is_file()
