"""benchmarks/learning_curves.py: curves.json from runs' metrics.jsonl, the plateau figure, named errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _run(root: Path, vals: list[float]) -> Path:
    root.mkdir(parents=True)
    lines = [json.dumps({"event": "train", "step": i, "loss": 1.0 / (i + 1), "epoch": i}) for i in range(len(vals))]
    lines += [json.dumps({"event": "eval", "step": i, "epoch": i + 1, "dice": v}) for i, v in enumerate(vals)]
    lines.append(json.dumps({"event": "summary", "seconds": 12.0, "best": max(vals), "best_step": 3}))
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_curves_and_plateau(tmp_path):
    from click.testing import CliRunner
    from learning_curves import main, plateau_gain

    vals = [0.1, 0.2, 0.3, 0.40, 0.41, 0.42, 0.43, 0.44, 0.445, 0.45]  # best before the last 2: 0.44
    a = _run(tmp_path / "a", vals)
    res = CliRunner().invoke(main, ["--out", str(tmp_path / "out"), f"seed0={a}"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / "curves.json").read_text())
    run = doc["runs"]["seed0"]
    assert [e["val_dice"] for e in run["eval"]] == vals and run["summary"]["seconds"] == 12.0
    # a resumed segment and a test-only re-run (`test=true --resume auto`) each log their own summary:
    # the wall is their sum, not the last one's ~0 s
    with (a / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "summary", "seconds": 3.0, "best": 0.45, "best_step": 9}) + "\n")
        f.write(json.dumps({"event": "summary", "seconds": 1e-05, "best": 0.45, "best_step": 9}) + "\n")
    res = CliRunner().invoke(main, ["--out", str(tmp_path / "out"), f"seed0={a}"])
    summary = json.loads((tmp_path / "out" / "curves.json").read_text())["runs"]["seed0"]["summary"]
    assert summary["seconds"] == pytest.approx(15.0) and summary["best_step"] == 9
    assert run["plateau_gain_points"] == pytest.approx(1.0) and (tmp_path / "out" / "curves.png").stat().st_size > 0
    assert plateau_gain([{"val_dice": v} for v in [0.5, 0.4, 0.3, 0.3, 0.3]], "dice") == pytest.approx(-20.0)
    bad = CliRunner().invoke(main, ["--out", str(tmp_path / "o2"), f"x={tmp_path / 'missing'}"])
    assert bad.exit_code != 0 and "metrics.jsonl does not exist" in bad.output
