"""Cross-modal distillation, measured on B-scans alone: student A learned from the teacher fed
B-scan + SLO, student B from the same teacher fed the B-scan only.

    python -m mirage_edge.distill.crossmodal_bench --teacher runs/pretrain-tiny/best --data data/mm \
        --student-a runs/xm-a/student --student-b runs/xm-b/student --image-size 128

On the test split (students see only the B-scan) it reports, per model: mean token cosine to the
teacher's multimodal tokens T(B+SLO) and to its B-scan-only tokens T(B); the alignment of the
student with the part the SLO contributes, cos(S - T(B), T(B+SLO) - T(B)); and a linear probe
(multinomial logistic regression, fitted on the train split) from patch tokens to the retinal
layer under each token (majority class of the set's `bscanlayermap`), as token accuracy and
macro-F1 - the same probe on both teacher views gives the reference. Prints a JSON record.
"""
from __future__ import annotations

import json
from typing import Any

import click
import numpy as np
import torch


def _token_labels(ds: Any, grid: tuple[int, int]) -> np.ndarray:
    """Majority layer class per token (N_images * gh * gw,) from the raw `bscanlayermap` PNGs."""
    from mirage_edge.data.io import read_image
    from mirage_edge.data.preprocess import resize_mask

    gh, gw = grid
    out = []
    for s in ds.samples:
        lm = resize_mask(read_image(s.modality("bscanlayermap")).astype(np.int64), ds.spec.size)
        h, w = lm.shape
        cells = lm.reshape(gh, h // gh, gw, w // gw).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
        out.append(np.array([np.bincount(c).argmax() for c in cells]))
    return np.concatenate(out)


@torch.no_grad()
def _tokens(ds: Any, fn: Any, n_patch: int, batch_size: int = 16) -> np.ndarray:
    from mirage_edge.distill.evaluate import batches

    return np.concatenate([fn(b)[:, :n_patch].float().numpy() for b in batches(ds, batch_size)])


def measure(teacher: str, data: str, student_a: str, student_b: str, image_size: int, threads: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.distill.data import DistillSamples, open_index
    from mirage_edge.distill.teacher import Teacher, load_teacher
    from mirage_edge.errors import DataError
    from mirage_edge.models import create_model

    if threads:
        torch.set_num_threads(threads)
    model = load_teacher(teacher, input_size=image_size)
    t_mm, t_b = Teacher(model, ["bscan", "slo"], name=teacher), Teacher(model, ["bscan"], name=teacher)
    index = open_index(data, "none")
    spec = PreprocessSpec(size=(image_size, image_size))
    splits = {s: DistillSamples(index, s, spec, ["bscan", "slo"], labels=False) for s in ("train", "test")}
    for name, ds in splits.items():
        if any(s.modality("bscanlayermap") is None for s in ds.samples):
            raise DataError(f"{data}: split {name!r} lacks bscanlayermap/ images (use a `multimodal` set)")
    grid = t_mm.grid
    n = grid[0] * grid[1]
    students = {k: create_model("mirage", checkpoint=p).eval() for k, p in (("A", student_a), ("B", student_b))}
    feats: dict[str, dict[str, np.ndarray]] = {}
    for split, ds in splits.items():
        f = {"teacher_bscan_slo": _tokens(ds, lambda b: t_mm.targets(b)["tokens"], n),
             "teacher_bscan": _tokens(ds, lambda b: t_b.targets(b)["tokens"], n)}
        for k, m in students.items():
            f[f"student_{k}"] = _tokens(ds, lambda b, m=m: m.forward_features(b["bscan"]), n)
        feats[split] = {k: v.reshape(-1, v.shape[-1]) for k, v in f.items()}
    y_tr, y_te = _token_labels(splits["train"], grid), _token_labels(splits["test"], grid)

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        num = (a * b).sum(-1)
        return float(np.mean(num / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-8)))

    te = feats["test"]
    delta = te["teacher_bscan_slo"] - te["teacher_bscan"]
    rec: dict[str, Any] = {"teacher": teacher, "data": data, "image_size": image_size, "grid": list(grid),
                           "n_train": len(splits["train"]), "n_test": len(splits["test"]),
                           "slo_effect_rel_norm": float(np.linalg.norm(delta) / np.linalg.norm(te["teacher_bscan"])),
                           "models": {}}
    for name in feats["test"]:
        x_tr, x_te = feats["train"][name], te[name]
        sc = StandardScaler().fit(x_tr)
        clf = LogisticRegression(max_iter=2000).fit(sc.transform(x_tr), y_tr)
        pred = clf.predict(sc.transform(x_te))
        r = {"probe_token_accuracy": float(accuracy_score(y_te, pred)),
             "probe_macro_f1": float(f1_score(y_te, pred, average="macro"))}
        if name.startswith("student"):
            r.update(cos_to_teacher_bscan_slo=cos(x_te, te["teacher_bscan_slo"]),
                     cos_to_teacher_bscan=cos(x_te, te["teacher_bscan"]),
                     slo_part_alignment=cos(x_te - te["teacher_bscan"], delta))
        rec["models"][name] = r
    return rec


@click.command(help=(__doc__ or "").split("\n")[0])
@click.option("--teacher", required=True, help="a MIRAGE encoder that takes bscan + slo")
@click.option("--data", required=True, help="a `multimodal` set (bscan/, slo/, bscanlayermap/)")
@click.option("--student-a", required=True, help="student/ of the run distilled from B-scan + SLO")
@click.option("--student-b", required=True, help="student/ of the run distilled from the B-scan only")
@click.option("--image-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
def main(teacher: str, data: str, student_a: str, student_b: str, image_size: int, threads: int) -> None:
    click.echo(json.dumps(measure(teacher, data, student_a, student_b, image_size, threads), indent=1))


if __name__ == "__main__":
    main()
