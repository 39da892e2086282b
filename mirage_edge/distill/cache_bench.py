"""Measure what the teacher cache buys: one stage-1 epoch with the teacher run online vs from the cache.

    python -m mirage_edge.distill.cache_bench --teacher mirage-base --student mobilenetv4_conv_small \
        --data data/layers --image-size 512 --n 16 --threads 2

Both epochs do the same student work (forward, feature loss, backward, AdamW step) on the same
images in the same order; the online epoch also runs the teacher forward per batch, the cached one
reads fp16 targets from the memory-mapped shards. The one-off cache fill is timed separately.
Prints a JSON record.
"""
from __future__ import annotations

import json
import tempfile
import time

import click
import torch


def measure(teacher: str, student: str, data: str, image_size: int, n: int, batch_size: int,
            threads: int, cache_dir: str | None = None) -> dict:
    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.distill.data import DistillSamples, collate, open_index
    from mirage_edge.distill.loop import attach_cache
    from mirage_edge.distill.losses import feature_loss
    from mirage_edge.distill.recipe import DistillRecipe, FeatureLossConfig
    from mirage_edge.distill.teacher import Teacher, load_teacher
    from mirage_edge.models.projector import ProjectedStudent
    from mirage_edge.models.students import build_student

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    # timing only: a registered name is built with random weights (the cost does not depend on them)
    from mirage_edge.models.registry import is_model

    rnd = is_model(teacher)
    t = Teacher(load_teacher(teacher, random_weights=rnd, input_size=image_size), ["bscan"], [], name=teacher,
                random_weights=rnd)
    index = open_index(data, "auto")
    spec = PreprocessSpec(size=(image_size, image_size))
    ds = DistillSamples(index, "train" if "train" in index.splits else None, spec, ["bscan"], limit=n)
    proj = ProjectedStudent(build_student(student, img_size=image_size), t.embed_dim, t.grid, t.num_global_tokens)
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-4)
    cfg = FeatureLossConfig()

    def epoch(cached: bool) -> float:
        t0 = time.perf_counter()
        for start in range(0, len(ds), batch_size):
            batch = collate([ds[i] for i in range(start, min(len(ds), start + batch_size))])
            target = batch["t_tokens"] if cached else t.targets(batch)["tokens"]
            loss, _ = feature_loss(proj.forward_features(batch["bscan"]), target, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    epoch(False)  # warm-up (allocator, oneDNN kernels)
    online = epoch(False)
    recipe = DistillRecipe()
    with tempfile.TemporaryDirectory() as tmp:
        recipe.cache.dir = cache_dir or tmp
        t0 = time.perf_counter()
        stats = attach_cache(ds, t, recipe, False, lambda m: None)
        fill = time.perf_counter() - t0
        epoch(True)
        cached = epoch(True)
        ds.cache = None
    return {"teacher": teacher, "student": student, "image_size": image_size, "n": len(ds),
            "batch_size": batch_size, "threads": threads, "epoch_online_s": online, "epoch_cached_s": cached,
            "speedup": online / cached, "cache_fill_s": fill, "cache_entries": stats["computed"]}


@click.command(help=(__doc__ or "").split("\n")[0])
@click.option("--teacher", default="mirage-base", show_default=True)
@click.option("--student", default="mobilenetv4_conv_small", show_default=True)
@click.option("--data", required=True)
@click.option("--image-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--n", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--cache-dir", default=None)
def main(teacher: str, student: str, data: str, image_size: int, n: int, batch_size: int, threads: int,
         cache_dir: str | None) -> None:
    rec = measure(teacher, student, data, image_size, n, batch_size, threads, cache_dir)
    click.echo(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
