"""Teacher-output cache: round trip, reuse, and invalidation (changed teacher / preprocessing / files)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from mirage_edge.distill.cache import CacheKey, TeacherCache

torch.set_num_threads(2)
SHAPES = {"tokens": [5, 4], "l0": [4, 4]}


def _key(**kw) -> CacheKey:
    base = dict(teacher_hash="a" * 64, outputs=SHAPES, preprocess={"size": [64, 64], "scaling": "minmax"})
    base.update(kw)
    return CacheKey(**base)


def _fill(cache: TeacherCache, ids: list[str], fp: str = "f") -> int:
    todo = cache.missing([(i, fp) for i in ids])
    for sid, v in todo:
        seed = sum(map(ord, sid)) + v
        cache.write(sid, v, {n: np.full(s, seed, np.float32) for n, s in SHAPES.items()})
    cache.commit()
    return len(todo)


def test_round_trip_fp16_and_reuse(tmp_path):
    c = TeacherCache(tmp_path, _key(views=2), shard_size=3).open()
    assert c.status == "new"
    ids = [f"train/s{i}" for i in range(5)]
    assert _fill(c, ids) == 10  # 5 samples x 2 views, spanning 4 shards
    got = c.read("train/s3", 1)
    assert got["tokens"].dtype == np.float32 and got["tokens"].shape == (5, 4)
    assert float(got["l0"][0, 0]) == float(np.float16(sum(map(ord, "train/s3")) + 1))
    c.close()
    again = TeacherCache(tmp_path, _key(views=2), shard_size=3).open()
    assert again.status == "reused"
    assert again.missing([(i, "f") for i in ids]) == []
    np.testing.assert_array_equal(again.read("train/s3", 1)["tokens"], got["tokens"])
    manifest = json.loads((again.dir / "manifest.json").read_text())
    assert manifest["digest"] == _key(views=2).digest() and again.count() == 10


def test_changed_teacher_or_preprocessing_never_reuses(tmp_path):
    c = TeacherCache(tmp_path, _key()).open()
    _fill(c, ["a", "b"])
    other_teacher = TeacherCache(tmp_path, _key(teacher_hash="b" * 64)).open()
    assert other_teacher.dir != c.dir and other_teacher.status == "new"
    assert len(other_teacher.missing([("a", "f"), ("b", "f")])) == 2
    other_pre = TeacherCache(tmp_path, _key(preprocess={"size": [64, 64], "scaling": "divide"})).open()
    assert other_pre.status == "new" and len(other_pre.missing([("a", "f")])) == 1
    other_aug = TeacherCache(tmp_path, _key(aug_seed=1)).open()
    assert other_aug.status == "new"


def test_stale_manifest_or_broken_shard_is_rebuilt(tmp_path):
    c = TeacherCache(tmp_path, _key()).open()
    _fill(c, ["a", "b"])
    c.close()
    # someone swapped the teacher behind the same folder: the manifest no longer matches the key
    man = c.dir / "manifest.json"
    doc = json.loads(man.read_text())
    doc["key"]["teacher_hash"] = "c" * 64
    man.write_text(json.dumps(doc))
    again = TeacherCache(tmp_path, _key()).open()
    assert again.status.startswith("rebuilt") and "teacher_hash" in again.status
    assert len(again.missing([("a", "f"), ("b", "f")])) == 2
    _fill(again, ["a", "b"])
    again.close()
    shard = next(again.dir.glob("tokens.*.npy"))
    shard.write_bytes(shard.read_bytes()[:40])  # truncated file
    third = TeacherCache(tmp_path, _key()).open()
    assert third.status.startswith("rebuilt") and "shard" in third.status


def test_changed_file_content_is_recomputed(tmp_path):
    c = TeacherCache(tmp_path, _key()).open()
    _fill(c, ["a", "b"], fp="v1")
    todo = c.missing([("a", "v1"), ("b", "v2")])
    assert todo == [("b", 0)]
    assert not c.has("b", 0)
    from mirage_edge.errors import DataError

    with pytest.raises(DataError, match="no entry"):
        c.read("b", 0)


def test_fill_with_real_teacher_and_invalidate_on_weight_change(tmp_path):
    """End to end with a MIRAGE teacher: second fill computes nothing; changed weights recompute all."""
    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.data.synth import synthesize
    from mirage_edge.distill.data import DistillSamples, open_index
    from mirage_edge.distill.loop import attach_cache
    from mirage_edge.distill.recipe import DistillRecipe
    from mirage_edge.distill.teacher import Teacher
    from mirage_edge.models import create_model

    root = synthesize(tmp_path / "d", "layers", 4, seed=0, size=64)
    index = open_index(root, "seg")
    model = create_model("mirage-tiny", input_size=64, depth=1, in_domains=["bscan"], out_domains=[])
    calls = {"n": 0}
    teacher = Teacher(model, ["bscan"], [0])
    orig = teacher.targets

    def counting(batch, with_logits=False):
        calls["n"] += len(batch["bscan"])
        return orig(batch, with_logits)

    teacher.targets = counting  # type: ignore[method-assign]
    recipe = DistillRecipe()
    recipe.cache.dir = str(tmp_path / "cache")
    ds = DistillSamples(index, "train", PreprocessSpec(size=(64, 64)), ["bscan"])
    s1 = attach_cache(ds, teacher, recipe, False, lambda m: None)
    assert s1["computed"] == len(ds) == calls["n"]
    item = ds[0]
    with torch.no_grad():
        direct = orig({"bscan": item["bscan"][None]})
    # fp16 storage: within half-precision rounding of the live teacher
    torch.testing.assert_close(item["t_tokens"], direct["tokens"][0], atol=2e-2, rtol=1e-2)
    ds2 = DistillSamples(index, "train", PreprocessSpec(size=(64, 64)), ["bscan"])
    s2 = attach_cache(ds2, teacher, recipe, False, lambda m: None)
    assert s2["computed"] == 0 and s2["status"] == "reused" and calls["n"] == len(ds)
    with torch.no_grad():
        model.global_tokens.add_(0.1)  # "fine-tuned" teacher: same architecture, new weights
    changed = Teacher(model, ["bscan"], [0])
    s3 = attach_cache(DistillSamples(index, "train", PreprocessSpec(size=(64, 64)), ["bscan"]), changed, recipe,
                      False, lambda m: None)
    assert s3["computed"] == len(ds) and s3["dir"] != s1["dir"]
    s4 = attach_cache(DistillSamples(index, "train", PreprocessSpec(size=(64, 64), scaling="divide"), ["bscan"]),
                      changed, recipe, False, lambda m: None)
    assert s4["computed"] == len(ds) and s4["dir"] != s3["dir"]


def _fill_in_process(root: str, ids: list[str], barrier) -> None:
    cache = TeacherCache(root, _key(views=2), shard_size=3)
    barrier.wait()
    with cache.locked():
        cache.open()
        for k, (sid, v) in enumerate(cache.missing([(i, "f") for i in ids])):
            seed = sum(map(ord, sid)) + v
            cache.write(sid, v, {n: np.full(s, seed, np.float32) for n, s in SHAPES.items()})
            if k % 4 == 3:  # publish often, as fill_cache does, so an unlocked reader would see halves
                cache.commit()


def test_concurrent_fills_of_one_cache_keep_every_entry(tmp_path):
    """Two runs filling the same cache at once (two students distilled side by side) must not
    overwrite each other's rows or index entries, nor delete a folder the other is writing."""
    mp = pytest.importorskip("multiprocessing")
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    pytest.importorskip("fcntl", reason="the cache lock is POSIX flock")
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    a, b = [f"train/s{i}" for i in range(0, 60)], [f"train/s{i}" for i in range(30, 90)]
    procs = [ctx.Process(target=_fill_in_process, args=(str(tmp_path), ids, barrier)) for ids in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = TeacherCache(tmp_path, _key(views=2), shard_size=3).open()
    assert cache.status == "reused"
    ids = sorted(set(a) | set(b))
    assert cache.missing([(i, "f") for i in ids]) == []
    for sid in ids:
        for v in (0, 1):
            assert float(cache.read(sid, v)["l0"][0, 0]) == float(np.float16(sum(map(ord, sid)) + v)), (sid, v)


def test_empty_shard_is_rebuilt(tmp_path):
    c = TeacherCache(tmp_path, _key()).open()
    _fill(c, ["a"])
    c.close()
    next(c.dir.glob("tokens.*.npy")).write_bytes(b"")  # a crash between create and header write
    again = TeacherCache(tmp_path, _key()).open()
    assert again.status.startswith("rebuilt") and "corrupt shard" in again.status


def test_a_teacher_with_batchnorm_has_a_weights_hash_that_follows_its_running_statistics():
    """BatchNorm's 0-d `num_batches_tracked` buffer broke the hash (issue #18's BN-path teacher); its running
    statistics are weights for the cache: new statistics must give a new key."""
    from mirage_edge.distill.teacher import weights_hash

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    before = weights_hash(net)
    assert before == weights_hash(net)
    net.train()(torch.rand(2, 1, 8, 8))  # moves the running mean / var and counts a batch
    assert weights_hash(net) != before
    # n-d tensors hash as before the 0-d fix: a cache filled earlier keeps its key
    conv = torch.nn.Conv2d(1, 2, 1)
    h = hashlib.sha256()
    for name, t in sorted(conv.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert weights_hash(conv) == h.hexdigest()
