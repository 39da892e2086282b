"""A teacher cache whose contents were altered is never served (issue #22 item 4): every committed row
carries a content checksum; bytes changed in place (same size, same header) are recomputed, not reused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mirage_edge.distill.cache import CacheKey, TeacherCache
from mirage_edge.errors import DataError

torch.set_num_threads(2)
SHAPES = {"tokens": [5, 4], "l0": [4, 4]}


def _key() -> CacheKey:
    return CacheKey(teacher_hash="a" * 64, outputs=SHAPES, preprocess={"size": [64, 64]})


def _teacher(sid: str) -> dict[str, np.ndarray]:
    """What the 'teacher' computes for a sample: distinct values per sample and output."""
    seed = sum(map(ord, sid))
    return {n: np.arange(np.prod(s), dtype=np.float32).reshape(s) / 8 + seed for n, s in SHAPES.items()}


def _fill(cache: TeacherCache, ids: list[str]) -> list[tuple[str, int]]:
    todo = cache.missing([(i, "fp") for i in ids])
    for sid, v in todo:
        cache.write(sid, v, _teacher(sid))
    cache.commit()
    return todo


def _alter_row(cache: TeacherCache, name: str, sid: str) -> None:
    """Flip bytes of `sid`'s row in one output's shard, rewriting the file at the same size."""
    r = cache.row(sid, 0)
    path = cache._shard_path(name, r // cache.shard_size)
    data = bytearray(path.read_bytes())
    row_bytes = int(np.prod(SHAPES[name])) * 2  # fp16
    start = len(data) - cache.shard_size * row_bytes + (r % cache.shard_size) * row_bytes
    data[start:start + 4] = bytes(b ^ 0x5A for b in data[start:start + 4])
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def _served_equals_teacher(cache: TeacherCache, sid: str) -> None:
    got = cache.read(sid, 0)
    for n, want in _teacher(sid).items():
        np.testing.assert_array_equal(got[n], want.astype(np.float16).astype(np.float32))


def test_bytes_altered_in_place_are_recomputed_by_the_next_run(tmp_path):
    ids = ["a", "b", "c"]
    c = TeacherCache(tmp_path, _key(), shard_size=2).open()
    assert len(_fill(c, ids)) == 3
    c.close()
    _alter_row(c, "tokens", "b")

    again = TeacherCache(tmp_path, _key(), shard_size=2).open()
    assert again.status.startswith("reused") and "failed their content checksum" in again.status
    assert not again.has("b", 0) and again.has("a", 0) and again.has("c", 0)
    assert _fill(again, ids) == [("b", 0)]  # only the altered row is recomputed
    for sid in ids:
        _served_equals_teacher(again, sid)
    again.close()
    third = TeacherCache(tmp_path, _key(), shard_size=2).open()
    assert third.status == "reused" and third.missing([(i, "fp") for i in ids]) == []


def test_an_alteration_found_on_read_is_refused_then_recomputed(tmp_path):
    """A change the file status does not show (here: made after open) is caught on the first read."""
    ids = ["a", "b", "c"]
    c = TeacherCache(tmp_path, _key(), shard_size=2).open()
    _fill(c, ids)
    c.close()
    reader = TeacherCache(tmp_path, _key(), shard_size=2).open()
    assert reader.status == "reused"
    _alter_row(reader, "l0", "a")
    with pytest.raises(DataError, match="'a' view 0 .*fail their content checksum"):
        reader.read("a", 0)
    _served_equals_teacher(reader, "b")  # the intact row of the same shard is still served
    _served_equals_teacher(reader, "c")
    flag = reader.dir / "shard.00000.altered"
    assert flag.is_file()  # the reader flagged it for the next run

    nxt = TeacherCache(tmp_path, _key(), shard_size=2).open()
    assert "failed their content checksum" in nxt.status
    assert _fill(nxt, ids) == [("a", 0)]
    _served_equals_teacher(nxt, "a")
    nxt.close()
    assert not flag.exists()


def test_an_unchanged_cache_is_not_rehashed_at_open(tmp_path, monkeypatch):
    ids = [f"s{i}" for i in range(6)]
    c = TeacherCache(tmp_path, _key(), shard_size=2).open()
    _fill(c, ids)
    c.close()
    calls = []
    orig = TeacherCache._row_sum
    monkeypatch.setattr(TeacherCache, "_row_sum", lambda self, r: calls.append(r) or orig(self, r))
    again = TeacherCache(tmp_path, _key(), shard_size=2).open()
    assert again.status == "reused" and again.missing([(i, "fp") for i in ids]) == [] and calls == []
    again.read("s2", 0)
    assert sorted(calls) == [2, 3]  # its shard, once
    again.read("s3", 0)
    again.read("s2", 0)
    assert sorted(calls) == [2, 3]


def test_an_index_checksum_that_does_not_match_is_never_served(tmp_path):
    """The checksums live in the SQLite index: one that no longer matches the bytes (index and shard out of
    step, whichever was altered) is refused on read and recomputed by the next run."""
    import sqlite3

    c = TeacherCache(tmp_path, _key()).open()
    _fill(c, ["a", "b"])
    c.close()
    with sqlite3.connect(c.dir / "index.sqlite") as db:
        db.execute("UPDATE entries SET sum = ? WHERE row = ?", (b"\0" * 16, c.row("a", 0)))
    db.close()
    reader = TeacherCache(tmp_path, _key()).open()
    with pytest.raises(DataError, match="fail their content checksum"):
        reader.read("a", 0)
    _served_equals_teacher(reader, "b")
    again = TeacherCache(tmp_path, _key()).open()
    assert "failed their content checksum" in again.status and not again.has("a", 0)
    assert _fill(again, ["a", "b"]) == [("a", 0)]
    _served_equals_teacher(again, "a")


def test_copied_cache_is_checked_once_then_trusted(tmp_path, monkeypatch):
    """A cache moved or copied elsewhere (new inodes and ctimes) is re-hashed at its first open only."""
    import shutil

    c = TeacherCache(tmp_path / "one", _key(), shard_size=2).open()
    _fill(c, ["a", "b", "c"])
    c.close()
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    calls = []
    orig = TeacherCache._row_sum
    monkeypatch.setattr(TeacherCache, "_row_sum", lambda self, r: calls.append(r) or orig(self, r))
    with TeacherCache(tmp_path / "two", _key(), shard_size=2).locked() as moved:
        moved.open()
        assert moved.status == "reused" and sorted(calls) == [0, 1, 2]
    calls.clear()
    TeacherCache(tmp_path / "two", _key(), shard_size=2).open()
    assert calls == []


def test_next_distill_run_recomputes_the_altered_rows_with_the_teacher(tmp_path):
    """End to end: a MIRAGE teacher fills the cache; one sample's stored tokens are altered in place;
    the next run recomputes exactly that sample and serves what the teacher computes."""
    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.data.synth import synthesize
    from mirage_edge.distill.data import DistillSamples, open_index
    from mirage_edge.distill.loop import attach_cache
    from mirage_edge.distill.recipe import DistillRecipe
    from mirage_edge.distill.teacher import Teacher
    from mirage_edge.models import create_model

    root = synthesize(tmp_path / "d", "layers", 4, seed=0, size=64)
    index = open_index(root, "seg")
    torch.manual_seed(0)
    model = create_model("mirage-tiny", input_size=64, depth=1, in_domains=["bscan"], out_domains=[])
    teacher = Teacher(model, ["bscan"], [0])
    recipe = DistillRecipe()
    recipe.cache.dir = str(tmp_path / "cache")

    def samples() -> DistillSamples:
        return DistillSamples(index, "train", PreprocessSpec(size=(64, 64)), ["bscan"])

    ds = samples()
    first = attach_cache(ds, teacher, recipe, False, lambda m: None)
    assert first["computed"] == len(ds) >= 2
    victim = ds.sample_id(1)
    cache = ds.cache
    r = cache.row(victim, 0)
    path = cache._shard_path("tokens", r // cache.shard_size)
    data = bytearray(path.read_bytes())
    row_bytes = int(np.prod(cache.key.outputs["tokens"])) * 2
    start = len(data) - cache.shard_size * row_bytes + (r % cache.shard_size) * row_bytes
    data[start:start + row_bytes] = np.full(row_bytes // 2, 7.0, np.float16).tobytes()  # plausible but wrong
    path.write_bytes(bytes(data))

    logs: list[str] = []
    ds2 = samples()
    second = attach_cache(ds2, teacher, recipe, False, logs.append)
    assert second["computed"] == 1 and "content checksum" in second["status"], logs
    for i in range(len(ds2)):
        item = ds2[i]
        with torch.no_grad():
            direct = teacher.targets({"bscan": item["bscan"][None]})
        torch.testing.assert_close(item["t_tokens"], direct["tokens"][0], atol=2e-2, rtol=1e-2)
    assert not torch.all(ds2[1]["t_tokens"] == 7.0)
