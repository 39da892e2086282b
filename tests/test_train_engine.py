"""The generic training engine: schedule, param groups, checkpoints, exact resume, SIGKILL, DDP (gloo).

A toy model keeps these fast; the MIRAGE-specific paths are in test_train_finetune/pretrain.py.
This file doubles as the child script for the subprocess tests (`python test_train_engine.py ...`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


class ToySet(torch.utils.data.Dataset):
    """Fixed regression data; items get a random flip so augmentation RNG matters for resume."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.randn(6, 2, generator=g) + 0.1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        sign = 1.0 if torch.rand(()) < 0.5 else -1.0  # "augmentation" drawn from the global RNG
        return self.x[i] * sign, self.y[i] * sign


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 16), nn.Linear(16, 16)])
        self.head = nn.Linear(16, 2)
        self.drop = nn.Dropout(0.1)  # consumes the training RNG every step

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(self.drop(x))


def toy_loss(model, batch):
    x, y = batch
    out = model(x)
    loss = ((out - y) ** 2).mean()
    return loss, {"mae": (out - y).abs().mean().detach()}


def make_trainer(run_dir, *, batch_size=8, epochs=3, checkpoint_every=0, grad_accum=1, max_steps=0,
                 evaluate=None, patience=0, dropout=True, patience_start_epoch=0, min_delta=0.0):
    from mirage_edge.train.config import LoopConfig
    from mirage_edge.train.engine import Trainer
    from mirage_edge.train.optim import CosineSchedule, build_adamw

    torch.manual_seed(0)
    model = Toy()
    if not dropout:
        model.drop.p = 0.0
    loop = LoopConfig(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, log_every=2, seed=3,
                      checkpoint_every=checkpoint_every, keep_checkpoints=10, max_steps=max_steps,
                      progress=False, clip_grad=1.0, patience=patience, min_delta=min_delta,
                      patience_start_epoch=patience_start_epoch)
    opt = build_adamw(model, lr=3e-2, weight_decay=0.05, layer_decay=0.8)
    data = ToySet()
    from mirage_edge.train.engine import steps_per_epoch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = steps_per_epoch(len(data), loop, world) * epochs
    sched = CosineSchedule(3e-2, total, warmup_steps=2, min_lr=1e-4)
    return Trainer(model, toy_loss, data, loop=loop, optimizer=opt, schedule=sched, run_dir=run_dir,
                   evaluate=evaluate, monitor="neg_mse" if evaluate else None, config={"toy": True})


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# ------------------------------------------------------------------------------------ unit


def test_cosine_schedule_warmup_and_decay():
    from mirage_edge.train.optim import CosineSchedule

    s = CosineSchedule(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(0.5)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55)
    assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)


def test_param_groups_layer_decay_and_no_decay():
    from mirage_edge.train.optim import param_groups

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.global_tokens = nn.Parameter(torch.zeros(1, 1, 4))
            self.patch = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.head = nn.Linear(4, 2)

    groups = param_groups(M(), 0.05, layer_decay=0.75)
    by_name = {n: g for g in groups for n in g["param_names"]}
    L = 3
    assert by_name["patch.weight"]["lr_scale"] == pytest.approx(0.75 ** (L + 1))
    assert by_name["blocks.1.weight"]["lr_scale"] == pytest.approx(0.75 ** (L + 1 - 2))
    assert by_name["head.weight"]["lr_scale"] == pytest.approx(1.0)
    assert by_name["global_tokens"]["weight_decay"] == 0.0
    assert by_name["blocks.0.bias"]["weight_decay"] == 0.0
    assert by_name["blocks.0.weight"]["weight_decay"] == 0.05


def test_checkpoint_roundtrip_is_pickle_free_and_verified(tmp_path):
    from mirage_edge.errors import CheckpointError
    from mirage_edge.train.checkpoint import load_checkpoint, save_checkpoint

    tr = make_trainer(tmp_path / "run", epochs=1)
    tr.fit()
    ck = tmp_path / "ck"
    save_checkpoint(ck, tr.model, optimizer=tr.optimizer, scheduler=tr.schedule, state={"step": 7},
                    config={"a": 1})
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["config.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng.safetensors", "trainer_state.json"]
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in ck.iterdir())
    tr2 = make_trainer(tmp_path / "run2", epochs=1)
    doc = load_checkpoint(ck, tr2.model, optimizer=tr2.optimizer)
    assert doc["state"]["step"] == 7 and doc["config"] == {"a": 1}
    assert_same(weights(tr.model), weights(tr2.model))
    s1, s2 = tr.optimizer.state_dict(), tr2.optimizer.state_dict()
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(v, s2["state"][pid][k])
    # corruption is detected, not silently loaded
    with open(ck / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ck, tr2.model)


def test_resume_mid_epoch_matches_uninterrupted_in_process(tmp_path):
    # 48 samples / batch 8 = 6 steps per epoch; checkpoint every 4 steps -> step 4 is mid-epoch 1
    full = make_trainer(tmp_path / "full", epochs=2, checkpoint_every=4)
    full.fit()
    ref = weights(full.model)
    ck = tmp_path / "full" / "checkpoints" / "step_00000004"
    assert ck.is_dir(), sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    part = make_trainer(tmp_path / "part", epochs=2, checkpoint_every=4)
    res = part.fit(resume=ck)
    assert res.steps == 12
    assert_same(ref, weights(part.model))


def test_grad_accum_matches_big_batch_without_dropout(tmp_path):
    a = make_trainer(tmp_path / "a", epochs=1, batch_size=8, dropout=False)
    a.fit()
    b = make_trainer(tmp_path / "b", epochs=1, batch_size=8, grad_accum=4, dropout=False)
    b.fit()
    assert_same(weights(a.model), weights(b.model), atol=1e-5)


def test_best_checkpoint_and_early_stopping(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(1)
        # improves once, then gets worse -> patience 2 stops after epoch 3
        return {"neg_mse": [0.0, 1.0, 0.5, 0.4, 0.3, 0.2][len(calls) - 1]}

    tr = make_trainer(tmp_path / "run", epochs=6, evaluate=evaluate, patience=2)
    res = tr.fit()
    assert res.stopped_early and res.epochs_done == 4
    assert res.best_metric == 1.0 and res.best_step == 12
    from mirage_edge.train.checkpoint import read_trainer_state

    assert read_trainer_state(tmp_path / "run" / "best")["state"]["best_step"] == 12
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in lines} >= {"train", "eval", "summary"}
    assert all("loss" in r for r in lines if r["event"] == "train")


def test_patience_counts_only_after_patience_start_epoch(tmp_path):
    """The official MIRAGE rule: bad evaluations count towards patience from epoch `start` (0-based) on;
    an improvement before that still updates best/."""
    from mirage_edge.train.config import LoopConfig

    values = [1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]

    def run(name, start):
        calls = []

        def evaluate(model):
            calls.append(1)
            return {"neg_mse": values[len(calls) - 1]}

        return make_trainer(tmp_path / name, epochs=7, evaluate=evaluate, patience=2,
                            patience_start_epoch=start).fit()

    plain = run("plain", 0)  # epochs 2, 3 are bad -> stop after 3
    assert plain.stopped_early and plain.epochs_done == 3
    late = run("late", 3)    # epochs 2, 3 not counted (0-based 1, 2 < 3); epochs 4, 5 are -> stop after 5
    assert late.stopped_early and late.epochs_done == 5
    assert late.best_metric == 1.0 and late.best_step == 6
    with pytest.raises(ValueError, match="patience_start_epoch"):
        LoopConfig(patience_start_epoch=-1)


def test_best_follows_small_improvements_while_patience_wants_min_delta(tmp_path):
    """A reconstruction loss of ~0.01 improves in steps smaller than min_delta: best/ must still move
    to the lowest value (it stayed at the first one within 0.001 before), while patience counts
    evaluations that do not beat the last reset by min_delta."""
    values = [0.0100, 0.0103, 0.0106, 0.0109, 0.0112]  # every epoch a little better, never by 0.001

    calls = []

    def evaluate(model):
        calls.append(1)
        return {"neg_mse": values[len(calls) - 1]}

    res = make_trainer(tmp_path / "run", epochs=5, evaluate=evaluate, patience=3, min_delta=0.001).fit()
    assert res.stopped_early and res.epochs_done == 4  # epochs 2-4 are not 0.001 above 0.0100
    assert res.best_metric == 0.0109 and res.best_step == 24  # the last evaluated, not the first


# ---------------------------------------------------------------------------- subprocesses


def _child(run_dir: str, mode: str) -> None:
    """Child entry: train the toy to the end (optionally resuming) and dump the final weights."""
    torch.set_num_threads(1)
    if mode == "slow":  # slows each step so the parent can kill it mid-epoch
        orig = toy_loss

        def slow_loss(model, batch):
            time.sleep(0.15)
            return orig(model, batch)

        globals()["toy_loss"] = slow_loss
    tr = make_trainer(run_dir, epochs=2, checkpoint_every=1,
                      dropout=mode != "nodrop", batch_size=8)
    tr.fit(resume="auto")
    if tr.info.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights(tr.model).items()}, str(Path(run_dir) / "final.safetensors"))
    from mirage_edge.train.distributed import shutdown_distributed

    shutdown_distributed()


def _load(p: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(p))


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_sigkill_mid_epoch_then_resume_matches(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, str(HERE), str(ref_dir), "normal"], check=True, env=_env(), timeout=300)
    proc = subprocess.Popen([sys.executable, str(HERE), str(run_dir), "slow"], env=_env())
    ckroot = run_dir / "checkpoints"
    deadline = time.time() + 120
    # kill once step 3 (mid-epoch 1 of 6 steps) is on disk; the next save may be in flight
    while time.time() < deadline and not (ckroot / "step_00000003").is_dir():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final.safetensors").exists()
    done = [p for p in ckroot.iterdir() if p.name.startswith("step_")]
    for p in done:  # every visible checkpoint is complete and verifies
        from mirage_edge.train.checkpoint import load_checkpoint

        load_checkpoint(p)
    subprocess.run([sys.executable, str(HERE), str(run_dir), "normal"], check=True, env=_env(), timeout=300)
    assert_same(_load(ref_dir / "final.safetensors"), _load(run_dir / "final.safetensors"))
    assert not [p for p in ckroot.iterdir() if p.name.startswith(".tmp-")]


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to the interpreter")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(HERE), str(one), "nodrop"], check=True, env=_env(), timeout=300)
    subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(HERE), str(two), "nodrop"],
                   check=True, env=_env(), timeout=300)
    assert_same(_load(one / "final.safetensors"), _load(two / "final.safetensors"), atol=1e-5)
    state = json.loads((two / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    assert state["state"]["world_size"] == 2 and len(state["rng"]) == 2


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _child(sys.argv[1], sys.argv[2])
