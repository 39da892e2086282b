"""`mirage-edge info` / `convert` (convert is also exercised in test_models_checkpoint.py)."""
from __future__ import annotations

import json
import re

from click.testing import CliRunner

from mirage_edge.cli import cli


def test_info_large_uses_meta_and_reports_303m(monkeypatch, tmp_path):
    monkeypatch.setenv("MIRAGE_EDGE_HOME", str(tmp_path))
    res = CliRunner().invoke(cli, ["info", "mirage-large"])
    assert res.exit_code == 0, res.output
    enc = float(re.search(r"encoder ([\d.]+)M", res.output).group(1))
    assert 302 < enc < 305  # ViT-L/32 B-scan encoder (blocks + adapter + global token)
    assert "heads 16" in res.output and "bscanlayermap" in res.output
    assert "GFLOPs" in res.output and str(tmp_path) in res.output and "MIRAGE-Large.pth" in res.output


def test_info_json_tiny_counts_match_model():
    import torch

    from mirage_edge import create_model

    res = CliRunner().invoke(cli, ["info", "mirage-tiny", "--input-size", "256", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    m = create_model("mirage-tiny")
    assert data["params_total"] == sum(p.numel() for p in m.parameters())
    assert data["flops_input"] == [1, 1, 256, 256] and data["token_grid"] == [8, 8]
    # analytical check: 2 * MACs of the linear layers dominate; FLOPs must be at least that
    n, d, depth = 65, 192, 4
    linear = 2 * n * depth * (4 * d * d + 8 * d * d)
    attn = 2 * 2 * n * n * d * depth
    conv = 2 * 64 * 32 * 32 * d
    assert data["flops_per_image"] == linear + attn + conv
    del torch


def test_unknown_model_is_a_clean_error():
    res = CliRunner().invoke(cli, ["info", "mirage-larg"])
    assert res.exit_code == 2 and "did you mean 'mirage-large'" in res.output
