"""Benchmark suites: typed, strict TOML (`benchmarks/suites/*.toml`) -> `BenchSuite`, and the row plan.

A suite names tasks (datasets to evaluate on) and models. A model has up to four *forms*, each
benchmarked as its own row(s): a PyTorch module (`checkpoint` folder or `registry` name, random
weights when no checkpoint), exported `artifacts` (folders or globs; one row each), artifacts the
bench `export`s itself from that module (export target names; built once, cached, see
`mirage_edge.bench.deploy`), or a custom `factory` ("module:function" returning a `Runner`). Every
form is timed at each (threads, batch, input size) of `[timing]` and evaluated once on each of its
tasks. Paths may use `{root}` (runs folder, `--root`), `{data}` (datasets folder, `--data`) and
`{task}` (the task's name). Torch-free.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mirage_edge import config as _config
from mirage_edge.errors import ConfigError

Role = Literal["teacher", "student", "reference", "candidate", "baseline"]  # baseline: labels-only twin
BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt", "callable")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# Timing rounds per row (`timing.rounds`) unless `mirage-edge bench --rounds` says otherwise.
DEFAULT_ROUNDS = 3


@dataclass
class TimingConfig:
    """How rows are timed. Latency input is B x 1 x S x S for each S in `input_sizes`."""

    threads: list[int] = field(default_factory=lambda: [2])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    input_sizes: list[int] = field(default_factory=lambda: [512])
    warmup: int = 3
    min_warmup_s: float = 0.2
    min_iters: int = 5        # always timed, even past the budget (ViT-L at ~1 s/call)
    max_iters: int = 300
    budget_s: float = 2.0     # timed seconds per row once min_iters are done
    isolate: bool = True      # one fresh worker process per model form (crash isolation, own peak RSS)
    row_timeout_s: float = 900.0
    device: str = "cpu"
    # OpenMP threads sleep instead of spinning when idle. On a shared/busy CPU, spinning threads of
    # PyTorch's OpenMP pool slow calls by 100x (measured: 6.7 ms -> 810 ms at load 10 on 2 cores);
    # "" keeps the library default. Applied to isolated workers (set before the library loads).
    omp_wait_policy: str = "PASSIVE"
    # rows under `timing.ROUND_MAX_CALL_MS` per call are timed in this many interleaved rounds (fresh
    # processes, `budget_s / rounds` each); 1 times every row once. `--rounds` overrides it.
    rounds: int = DEFAULT_ROUNDS
    # INT8 peak (GOP/s at `peak_threads` threads) the report divides INT8 CPU rows' GOP/s by; 0 = the
    # measured baseline (`report.INT8_PEAK_GOPS`) on the CPU class it was measured on, nothing elsewhere
    int8_peak_gops: float = 0.0
    peak_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("threads", "batch_sizes", "input_sizes"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"timing.{name} must be a non-empty list of positive integers, got {values}")
        if self.min_iters < 1 or self.max_iters < self.min_iters:
            raise ValueError(f"need 1 <= timing.min_iters <= timing.max_iters, got {self.min_iters}, {self.max_iters}")
        if self.rounds < 1:
            raise ValueError(f"timing.rounds must be >= 1, got {self.rounds}")
        if self.int8_peak_gops < 0 or self.peak_threads < 1:
            raise ValueError(f"need timing.int8_peak_gops >= 0 and timing.peak_threads >= 1, got "
                             f"{self.int8_peak_gops}, {self.peak_threads}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"timing.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass
class SynthSpec:
    """Generate the task's dataset with `mirage_edge.data.synth.synthesize` when its folder is missing."""

    kind: Literal["layers", "fluid", "cls", "multimodal"] = "fluid"
    n: int = 48
    seed: int = 0
    size: int = 512


@dataclass
class TaskSpec:
    """A dataset in the RetinaBench layout to evaluate on (`path/<split>/...`)."""

    name: str
    kind: Literal["cls", "seg"]
    path: str
    split: str = "test"
    max_samples: int = 0          # 0 = every sample of the split
    synth: SynthSpec | None = None
    description: str = ""


@dataclass
class ModelSpec:
    label: str
    role: Role = "candidate"
    checkpoint: str = ""          # our checkpoint folder (model.safetensors + config.json)
    registry: str = ""            # registered model name; random weights unless `checkpoint` is set
    artifacts: list[str] = field(default_factory=list)  # artifact folders or globs
    factory: str = ""             # "module:function" -> Runner (custom backends, tests)
    # export targets (names in export/targets/ or paths) the bench builds from `checkpoint` or `registry`
    # (a registry name: seeded random weights + a fresh head of the task's kind and classes), cached by
    # weights hash + target; `export_set` = target overrides ("seg_argmax=true", "seg_mask_stride=4")
    export: list[str] = field(default_factory=list)
    export_set: list[str] = field(default_factory=list)
    head: dict[str, Any] = field(default_factory=dict)  # registry rows: task head options (default official)
    tasks: list[str] = field(default_factory=list)      # empty: every task of the suite
    backends: list[str] = field(default_factory=list)   # empty: every backend its forms offer
    evaluate: bool = True         # False: latency-only rows (random weights never evaluate)
    optional: bool = False        # True: an `artifacts` glob matching nothing gives no row instead of an error row

    def __post_init__(self) -> None:
        if not (self.checkpoint or self.registry or self.artifacts or self.factory):
            raise ValueError(f"model {self.label!r} needs one of checkpoint, registry, artifacts or factory")
        if self.export and not (self.checkpoint or self.registry):
            raise ValueError(f"model {self.label!r}: export needs a checkpoint or registry to export from")
        if self.export_set and not self.export:
            raise ValueError(f"model {self.label!r}: export_set without export targets")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise ValueError(f"model {self.label!r}: unknown backend(s) {bad}; choose from {list(BACKENDS)}")


@dataclass
class BenchSuite:
    name: str
    tasks: list[TaskSpec]
    models: list[ModelSpec]
    description: str = ""
    root: str = "demo-out"
    data: str = "data"
    timing: TimingConfig = field(default_factory=TimingConfig)
    eval_batch: int = 4
    # where the artifacts of models' `export` targets are cached ("" = $MIRAGE_EDGE_HOME/cache/bench-artifacts)
    export_cache: str = ""

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels must be unique, got {labels}")
        for m in self.models:
            unknown = [t for t in m.tasks if t not in names]
            if unknown:
                raise ValueError(f"model {m.label!r} names unknown task(s) {unknown}; suite tasks: {names}")


_REPO_SUITES = Path(__file__).resolve().parents[2] / "benchmarks" / "suites"


def _suite_folders() -> list[Path]:
    return [Path.cwd() / "benchmarks" / "suites", _REPO_SUITES]


def resolve_suite(name_or_path: str | Path) -> Path:
    """A suite file path, or a name looked up in ./benchmarks/suites and the source checkout's."""
    p = _config.find_config(name_or_path, _suite_folders())
    if p is None:
        raise ConfigError(f"unknown suite {str(name_or_path)!r}; give a .toml path or one of: "
                          f"{', '.join(_config.curated_names(_suite_folders())) or 'none found'}")
    return p


def load_suite(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BenchSuite:
    """Read a suite (path or name, see `resolve_suite`) strictly: unknown keys / wrong types ->
    ConfigError naming key and file."""
    return _config.load(BenchSuite, resolve_suite(path), overrides, curated=_suite_folders())


def expand(text: str, suite: BenchSuite, task: str = "") -> str:
    """Substitute {root}, {data} and {task} in a suite path."""
    try:
        return text.format(root=suite.root, data=suite.data, task=task)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"suite {suite.name!r}: bad placeholder in {text!r} (use {{root}}, {{data}}, {{task}})") from exc


@dataclass
class Form:
    """One benchmarkable thing: a model in one form (torch module / artifact folder / factory)."""

    model: ModelSpec
    kind: Literal["torch", "artifact", "factory", "export"]  # export: becomes artifact forms once built
    source: str                   # folder, registry name, "module:function" or (export) the target
    task: TaskSpec | None
    backend: str = ""             # "" = decided when loaded (artifacts: from metadata)
    problem: str = ""             # non-empty: cannot run (e.g. no artifact matches); becomes an error row
    note: str = ""                # added to the row's notes (e.g. where a bench export came from)

    @property
    def key(self) -> str:
        return f"{self.model.label}|{self.kind}|{self.source}|{self.backend}|{self.task.name if self.task else ''}"


def _artifact_dirs(pattern: str) -> list[str]:
    if any(ch in pattern for ch in "*?["):
        hits = sorted(glob.glob(pattern))
        return [h for h in hits if Path(h).is_dir()]
    return [pattern]


def plan_forms(suite: BenchSuite, backends: list[str] | None = None, models: list[str] | None = None) -> list[Form]:
    """All forms of the suite, in suite order; teacher forms are always kept (the reference of every ratio).

    `backends`/`models` filter rows (CLI flags); artifacts whose backend is only known from their
    metadata are filtered after loading, in the runner.
    """
    forms: list[Form] = []
    for m in suite.models:
        if models and m.label not in models and m.role != "teacher":
            continue
        tasks = [t for t in suite.tasks if not m.tasks or t.name in m.tasks] or [None]
        for task in tasks:
            tname = task.name if task else ""
            if m.factory:
                forms.append(Form(m, "factory", m.factory, task, backend="callable"))
            if m.checkpoint or m.registry:
                src = expand(m.checkpoint, suite, tname) if m.checkpoint else m.registry
                forms.append(Form(m, "torch", src, task, backend="torch"))
            # one form per listed runtime (an ONNX artifact can run on ONNX Runtime and OpenVINO)
            runtimes = [b for b in m.backends if b in ("onnxruntime", "openvino", "tensorrt")] or [""]
            for pattern in m.artifacts:
                pat = expand(pattern, suite, tname)
                dirs = _artifact_dirs(pat)
                if not dirs and not m.optional:
                    forms.append(Form(m, "artifact", pat, task, problem=f"no artifact folder matches {pat}"))
                forms.extend(Form(m, "artifact", d, task, backend=b) for d in dirs for b in runtimes)
            forms.extend(Form(m, "export", t, task) for t in m.export)
    out = []
    for f in forms:
        allowed = allowed_backends(f, backends)
        if allowed is None or not f.backend or f.backend in allowed:
            out.append(f)
    return out


def allowed_backends(form: Form, backends: list[str] | None) -> set[str] | None:
    """Backends a form may run on after its artifact metadata is known (None = any)."""
    allowed = set(form.model.backends) if form.model.backends else None
    if backends and form.model.role != "teacher":
        allowed = (allowed or set(BACKENDS)) & set(backends)
    return allowed


__all__ = ["BenchSuite", "TimingConfig", "TaskSpec", "SynthSpec", "ModelSpec", "Form", "load_suite", "resolve_suite", "plan_forms",
           "expand", "allowed_backends", "BACKENDS", "PRECISIONS", "DEFAULT_ROUNDS"]
