"""Distillation recipes: dataclasses loaded strictly from `distill/recipes/*.toml` (torch-free).

A recipe says which teacher (and what it sees), which student, which data, and the schedule of
the three stages (1: task-agnostic feature KD, 2: task-aware KD, QAT). The CLI flags
(`--teacher`, `--student`, `--data`, `--task`, `--qat`) and `key.sub=value` overrides are applied on
top of the file; the resolved recipe is stored with every checkpoint and in `<out>/recipe.toml`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from mirage_edge import config as cfgmod
from mirage_edge.errors import ConfigError

if TYPE_CHECKING:  # numpy + OpenCV: imported when used, so loading a recipe stays light
    from mirage_edge.data.preprocess import PreprocessSpec

Norm = Literal["layernorm", "l2", "none"]


def _check_ranges(spec: Any, section: str, positive: Sequence[str] = (),
                  non_negative: Sequence[str] = ()) -> None:
    """ValueError naming `section.key` for a value that cannot work (a batch of 0, a negative count)."""
    for name in positive:
        if getattr(spec, name) <= 0:
            raise ValueError(f"{section}.{name} must be > 0, got {getattr(spec, name)}")
    for name in non_negative:
        if getattr(spec, name) < 0:
            raise ValueError(f"{section}.{name} must be >= 0, got {getattr(spec, name)}")


@dataclass
class FeatureLossConfig:
    """Mix of feature-matching terms on normalized tokens (weights may be 0).

    norm: how both token sets are normalized per token before MSE / smooth-L1:
          "layernorm" (zero mean, unit variance over D, no affine; the MAE/EdgeSAM-style target),
          "l2" (unit length) or "none". Cosine is scale-free and ignores it.
    """

    mse: float = 1.0
    cosine: float = 1.0
    smooth_l1: float = 0.0
    smooth_l1_beta: float = 1.0
    norm: Norm = "layernorm"

    def __post_init__(self) -> None:
        if min(self.mse, self.cosine, self.smooth_l1) < 0 or self.mse + self.cosine + self.smooth_l1 <= 0:
            raise ValueError(f"feature loss weights must be >= 0 and not all 0, got {self}")



@dataclass
class TaskLossConfig:
    """Stage-2 (task-aware) loss: alpha * KD(T) + (1 - alpha) * CE [+ dice * GDice for seg]
    [+ feature * feature-matching of the encoder tokens]. `class_weights`: per-class CE weights, one
    per class of the teacher's head ([] = unweighted), for a lesion on ~0.5 % of the pixels; the
    labels-only twin uses the same."""

    alpha: float = 0.7
    temperature: float = 4.0
    dice: float = 1.0
    feature: float = 0.0
    class_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if any(w < 0 for w in self.class_weights) or (self.class_weights and not any(self.class_weights)):
            raise ValueError(f"class_weights must be >= 0 and not all 0, got {self.class_weights}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")




@dataclass
class TeacherSpec:
    """model: registered name, checkpoint path or hf:<dir>; config: JSON with the dimensions of an
    official checkpoint of a size other than Base/Large (e.g. the tiny fixture's tiny_config.json).
    random_weights: distil from a randomly initialised registered architecture on purpose (tests,
    timing); without it a registered name loads its official weights or fails saying where to put them.
    modalities: teacher inputs, B-scan first (["bscan", "slo"] = cross-modal KD).
    layers: encoder blocks matched as intermediate targets."""

    model: str = "mirage-tiny"
    config: str = ""
    random_weights: bool = False
    modalities: list[str] = field(default_factory=lambda: ["bscan"])
    layers: list[int] = field(default_factory=list)


@dataclass
class StudentSpec:
    """name: registered student. layer_map: teacher block -> student stage (keys are strings in TOML).
    reparameterize: fuse MobileOne/RepViT branches before QAT and export.
    upsample: projector to a finer teacher grid, "shuffle" (learned sub-pixel) or "bilinear".
    input_scale: upsample the input inside the student by 1, 2 or 4, so its stride-32 grid matches a
    teacher with 32 / input_scale px patches (e.g. 2 for the 16 px tiny cls teacher at 128 px)."""

    name: str = "student-tiny"
    layer_map: dict[str, int] = field(default_factory=dict)
    reparameterize: bool = True
    upsample: Literal["shuffle", "bilinear"] = "shuffle"
    input_scale: int = 1


@dataclass
class DataSpec:
    """path: a RetinaBench folder (seg / cls / multimodal / any image folder for task "none").
    image_size: model input, an int (square) or [H, W] (e.g. [256, 384] keeps a 496 x 768 B-scan's
    aspect); preprocessing is MIRAGE's (no mean/std)."""

    path: str = ""
    task: Literal["seg", "cls", "none", "auto"] = "auto"
    image_size: int | list[int] = 128
    scaling: Literal["minmax", "divide"] = "minmax"
    minmax_order: Literal["before_resize", "after_resize"] = "before_resize"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    views: int = 1
    augment: bool = False
    aug_seed: int = 0
    limit: int = 0

    def __post_init__(self) -> None:
        try:
            hw = self.hw
        except (TypeError, ValueError):
            raise ValueError(f"data.image_size must be an int or [H, W], got {self.image_size!r}") from None
        if min(hw) < 32 or hw[0] % 32 or hw[1] % 32:
            raise ValueError(f"data.image_size must be a multiple of 32 (student stride), got {self.image_size}")
        if self.views < 1:
            raise ValueError(f"data.views must be >= 1, got {self.views}")
        _check_ranges(self, "data", non_negative=("limit",))

    @property
    def hw(self) -> tuple[int, int]:
        """The model input as (H, W)."""
        from mirage_edge.models.config import as_pair

        return as_pair(self.image_size)

    def preprocess_spec(self) -> PreprocessSpec:
        """The preprocessing teacher and student see: H x W (`hw`), MIRAGE scaling."""
        from mirage_edge.data.preprocess import PreprocessSpec

        return PreprocessSpec(size=self.hw, scaling=self.scaling,
                              minmax_order=self.minmax_order)

    def labelled_task(self, found: str | None) -> str | None:
        """The labelled task a set whose layout says `found` trains / is scored on, or None
        (feature distillation only: an unlabelled set, or task = "none")."""
        return found if found in ("segmentation", "classification") and self.task != "none" else None


@dataclass
class Stage1Spec:
    """Task-agnostic feature distillation (epochs = 0 skips it).

    data: a folder of unlabelled B-scans (any image folder, or a RetinaBench set: its train split)
    to distill on instead of data.path's train split - e.g. a large unlabelled archive before
    task-aware stage 2 on a small labelled set. Same preprocessing and augmentation as `data`."""

    epochs: int = 5
    data: str = ""
    max_steps: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 0
    layer_weight: float = 1.0
    loss: FeatureLossConfig = field(default_factory=FeatureLossConfig)

    def __post_init__(self) -> None:
        _check_ranges(self, "stage1", positive=("batch_size", "lr"),
                      non_negative=("epochs", "max_steps", "weight_decay", "warmup_steps", "layer_weight"))


@dataclass
class Stage2Spec:
    """Task-aware distillation from a fine-tuned teacher (skipped for encoder-only teachers).

    mode "drop_in": the teacher's fine-tuned head runs on the projected student tokens (copied,
    trained on; `freeze_head` keeps it fixed). "new_head": a fresh head on the raw student features,
    built like the teacher's with `head` settings on top - e.g. ``{preds_per_patch = 64, class_dim
    = 16, depth = 0}``: a linear sub-pixel decoder straight from the stride-32 map to 1/4 resolution,
    about half the latency of the tiny teacher's head on a 2-core CPU (benchmarks/README.md).
    ``head = {type = "fpn", dim = 64}`` gives a CNN student a light FPN decoder on its stride-4..32
    stage maps instead (models/heads.FPNSegHead), for lesions of a few pixels.

    data: a folder of unlabelled B-scans (any image folder, or a RetinaBench set: its train split)
    added to data.path's train split for stage 2. The teacher's logits are their only target (the
    KD term; CE and Dice see the labelled images only): the teacher labels a transfer set larger
    than the labelled one.

    alpha_grid: KD weights (`loss.alpha`) to try, each a full stage 2 from the same stage-1
    weights with the same data order; the one with the best validation metric is kept (needs a val
    split). Include 0 (the labels alone on the distilled initialisation) so that a teacher weaker
    than the labels cannot make the student worse than that. Empty = `loss.alpha` only.

    calibrate (segmentation, needs a val split): after stage 2, and for the labels-only twin after
    its training, a foreground logit offset is chosen on validation and folded into the head's last
    bias (`mirage_edge.models.calibrate`): the threshold of a lesion of ~0.1 % of the pixels, which the
    losses leave under-confident, set where the val metric is best (0 kept on a tie).
    """

    epochs: int = 5
    data: str = ""
    alpha_grid: list[float] = field(default_factory=list)
    max_steps: int = 0
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    mode: Literal["drop_in", "new_head"] = "drop_in"
    freeze_head: bool = False
    head: dict[str, Any] = field(default_factory=dict)
    loss: TaskLossConfig = field(default_factory=TaskLossConfig)
    calibrate: bool = False

    def __post_init__(self) -> None:
        _check_ranges(self, "stage2", positive=("batch_size", "lr"),
                      non_negative=("epochs", "max_steps", "weight_decay", "warmup_steps"))
        if self.head and self.mode != "new_head":
            raise ValueError('stage2.head sets up a fresh head: it needs stage2.mode = "new_head"')
        if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid) or len(set(self.alpha_grid)) != len(self.alpha_grid):
            raise ValueError(f"stage2.alpha_grid must hold distinct values in [0, 1], got {self.alpha_grid}")


@dataclass
class QATSpec:
    """INT8 quantization-aware training with NNCF (see distill/README.md for why NNCF).

    Weights per-channel symmetric, activations per-tensor (NNCF's "performance" preset). The FP32
    student is the KD teacher. `ignored_types`: NNCF op types kept in float (e.g. layer_norm,
    softmax for ViTs) - recorded in the checkpoint. model_type "transformer" adds NNCF's ViT rules.

    Loss: alpha * KD(temperature) from the FP32 student + (1 - alpha) * CE [+ dice * GDice] on the
    labels. The default (alpha 1, dice 0) is pure KD: QAT reproduces the FP32 student in INT8, so
    INT8 - FP32 measures quantization only. Mixing the labels back in keeps training the task during
    QAT (measured: RepViT-M0.9 +0.95 Dice points from 2 QAT epochs with alpha 0.7 and Dice 1, with
    the quantizers off), which the INT8 - FP32 difference then also contains.

    eval_mode: the fake-quant model trains in eval mode - BatchNorm keeps the FP32 student's
    (precise) running statistics, as torch.ao's QAT recipe freezes them, and dropout is off - so it
    learns the FP32 student's deterministic output. In train mode, batch statistics of 8-16 images
    made QAT worse than calibration alone (cls MobileNetV4: INT8 - FP32 -2.5 points after 2 QAT
    epochs vs +0.4 after calibration; distill/README.md).
    """

    enabled: bool = False
    epochs: int = 2
    max_steps: int = 0
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    subset_size: int = 64
    model_type: Literal["default", "transformer"] = "default"
    ignored_types: list[str] = field(default_factory=list)
    ignored_names: list[str] = field(default_factory=list)
    temperature: float = 2.0
    alpha: float = 1.0
    dice: float = 0.0
    onnx_opset: int = 17
    eval_mode: bool = True

    def __post_init__(self) -> None:
        _check_ranges(self, "qat", positive=("batch_size", "lr", "subset_size", "temperature"),
                      non_negative=("epochs", "max_steps", "weight_decay", "warmup_steps"))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"qat.alpha must be in [0, 1], got {self.alpha}")
        if self.dice < 0:
            raise ValueError(f"qat.dice must be >= 0, got {self.dice}")


@dataclass
class BaselineSpec:
    """The labels-only twin (`--baseline`): the distilled student's exact architecture (backbone,
    projector, head type) trained from the same initial backbone weights (same seed), on the same
    labelled images, views, augmentation, batch size and learning rate as stage 2, with the labels
    alone (CE + the stage-2 Dice weight; no teacher, no cache); with `qat.enabled` also its INT8 form,
    by the same QAT. The report's KD gain is distilled - twin.

    epochs: 0 = stage1.epochs + stage2.epochs, so the twin gets as many passes over the training
    images as the distilled student had in all (it would otherwise lose on training length alone).
    lr: 0 = stage2.lr. qat: with qat.enabled, also the twin's INT8 form (the same QAT)."""

    enabled: bool = False
    epochs: int = 0
    lr: float = 0.0
    qat: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr < 0:
            raise ValueError(f"baseline.epochs and baseline.lr must be >= 0, got {self.epochs}, {self.lr}")


@dataclass
class CacheSpec:
    """Teacher-output cache (memory-mapped shards). dir "" = $MIRAGE_EDGE_HOME/cache/teacher.

    enabled = false is the online-teacher mode: no cache, the teacher runs beside the student at every
    step (on the same device). max_gb: refuse up front when the rows still to compute need more (0 =
    no limit; the free disk space is always checked). dtype: "float16", or "int8" (symmetric, one
    float16 scale per token / last-axis vector: about half the disk; part of the cache key, so each
    dtype has its own cache; see distill/README.md for its effect on the student)."""

    enabled: bool = True
    dir: str = ""
    shard_size: int = 256
    max_gb: float = 0.0
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.max_gb < 0 or self.shard_size < 1:
            raise ValueError(f"cache.max_gb must be >= 0 and cache.shard_size >= 1, got {self.max_gb}, {self.shard_size}")
        if self.dtype not in ("float16", "int8"):
            raise ValueError(f"cache.dtype must be float16 or int8, got {self.dtype!r}")


@dataclass
class RunSpec:
    """Execution settings shared by the stages. eval_every: epochs between validations (Dice / BAcc
    in stage 2 picks the best checkpoint; feature cosine in stage 1); 0 = once, at the end of a stage.
    precise_bn: batches (of eval_batch_size training images) over which BatchNorm statistics are
    re-estimated before every validation and at the end of every stage (0 = keep BN's running
    averages; see mirage_edge.distill.precise_bn)."""

    device: str = "cpu"
    threads: int = 0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    progress: bool = True
    num_workers: int = 0
    eval_batch_size: int = 16
    eval_every: int = 0
    precise_bn: int = 8

    def __post_init__(self) -> None:
        _check_ranges(self, "run", positive=("log_every", "eval_batch_size"),
                      non_negative=("threads", "checkpoint_every", "num_workers", "eval_every", "precise_bn"))


@dataclass
class DistillRecipe:
    """per_student: settings a recipe ships for one student family, as the command line's `key=value`
    overrides (`[per_student.repvit_m0_9]` `"qat.epochs" = 8`). They apply when `student.name` is
    that family, above the file's own settings and below the CLI's flags and overrides, so
    `--student NAME` runs with what the recipe measured for NAME. `load_recipe` consumes the table:
    the resolved recipe (printed, saved as RUN/recipe.toml) has them in its sections, an empty
    per_student (reloading it must not re-apply them over a command-line override) and the ones
    it took in `applied_per_student`, a record only."""

    name: str = "distill"
    out: str = "runs/distill"
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stage1: Stage1Spec = field(default_factory=Stage1Spec)
    stage2: Stage2Spec = field(default_factory=Stage2Spec)
    qat: QATSpec = field(default_factory=QATSpec)
    baseline: BaselineSpec = field(default_factory=BaselineSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    run: RunSpec = field(default_factory=RunSpec)
    per_student: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied_per_student: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for family, sets in self.per_student.items():
            bad = [k for k in sets if k.split(".", 1)[0] in ("student", "per_student", "applied_per_student", "name",
                                                             "out")]
            if bad:  # a family's settings must not change which family it is, nor where the run goes
                raise ValueError(f"per_student.{family} may not set {', '.join(bad)}")

    def to_dict(self) -> dict:
        return cfgmod.to_dict(self)


RECIPES_DIR = Path(__file__).resolve().parents[2] / "distill" / "recipes"


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file path, or a bare name looked up in distill/recipes/ (NAME or NAME.toml)."""
    p = cfgmod.find_config(name_or_path, [RECIPES_DIR])
    if p is None:
        known = cfgmod.curated_names([RECIPES_DIR])
        raise ConfigError(f"recipe {str(name_or_path)!r} not found "
                          f"(curated recipes: {', '.join(known) or 'none'})")
    return p


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = (),
                sets: Mapping[str, Any] | None = None) -> DistillRecipe:
    """Recipe from a TOML file (or the defaults), then `sets` (dotted key -> value; None = unset),
    then `key.sub=value` overrides; strict. A recipe file may ``extends = "NAME|PATH"`` another
    one (a curated name or a path relative to it) and list only what differs
    (`mirage_edge.config.read_config`)."""
    p = resolve_recipe_path(path) if path is not None else None
    rec = cfgmod.load(DistillRecipe, p, overrides, sets=sets, curated=[RECIPES_DIR])
    family = dict(rec.per_student.get(rec.student.name, {}))
    if family:
        given = {k: v for k, v in (sets or {}).items() if v is not None}
        try:
            rec = cfgmod.load(DistillRecipe, p, overrides, sets={**family, **given}, curated=[RECIPES_DIR])
        except ConfigError as exc:
            raise ConfigError(f"{p or 'recipe'}: per_student.{rec.student.name}: {exc}") from None
    if rec.per_student:
        rec.per_student, rec.applied_per_student = {}, family
    return rec


__all__ = ["DistillRecipe", "TeacherSpec", "StudentSpec", "DataSpec", "Stage1Spec", "Stage2Spec", "QATSpec",
           "BaselineSpec", "CacheSpec", "RunSpec", "FeatureLossConfig", "TaskLossConfig", "load_recipe", "resolve_recipe_path", "RECIPES_DIR"]
