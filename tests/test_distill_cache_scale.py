"""A teacher cache that scales (issue #25 item 4): a SQLite index committed row block by row block, files
recognised by their status without re-reading their bytes, and int8 storage with a per-token scale.
Costs at 10k-1M rows are measured by `python -m mirage_edge.distill.cache_scale_bench`, not here."""
from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest

import mirage_edge.distill.cache as cache_mod
import mirage_edge.distill.fingerprints as fp_mod
from mirage_edge.distill.cache import VERSION, CacheKey, TeacherCache, dequantize_int8, quantize_int8
from mirage_edge.distill.fingerprints import FileHashes
from mirage_edge.errors import DataError

SHAPES = {"tokens": [5, 4], "l0": [3]}


def _key(**kw) -> CacheKey:
    return CacheKey(**{"teacher_hash": "a" * 64, "outputs": SHAPES, "preprocess": {"size": [64, 64]}, **kw})


def _teacher(sid: str, v: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, sid)) * 7 + v)
    return {n: (rng.standard_normal(s) * 3).astype(np.float32) for n, s in SHAPES.items()}


def _fill(cache: TeacherCache, ids: list[str]) -> list[tuple[str, int]]:
    todo = cache.missing([(i, "fp") for i in ids])
    for sid, v in todo:
        cache.write(sid, v, _teacher(sid, v))
    cache.commit()
    return todo


# ------------------------------------------------------------------------------------------ index
def test_index_is_sqlite_and_readers_see_committed_rows_only(tmp_path):
    writer = TeacherCache(tmp_path, _key(), shard_size=4).open()
    _fill(writer, ["a", "b"])
    assert (writer.dir / "index.sqlite").is_file() and not (writer.dir / "index.json").exists()
    reader = TeacherCache(tmp_path, _key(), shard_size=4).open()
    assert reader.status == "reused" and reader.has("a", 0)
    rows = {s: writer.row(s, 0) for s in ("a", "b")}
    writer.missing([("c", "fp"), ("d", "fp")])
    writer.write("c", 0, _teacher("c"))
    assert writer.has("c", 0) and not reader.has("c", 0)  # written, not committed: the writer's own
    with pytest.raises(DataError, match="no entry"):
        reader.read("c", 0)
    writer.commit()
    assert reader.has("c", 0) and not reader.has("d", 0)  # the same reader, no reopen
    np.testing.assert_array_equal(reader.read("c", 0)["l0"], _teacher("c")["l0"].astype(np.float16))
    assert {s: reader.row(s, 0) for s in ("a", "b")} == rows  # committed rows never move
    assert reader.count() == 3


def test_missing_in_batches_over_many_ids_and_views(tmp_path):
    """More ids than one `IN (...)` lookup takes, two views, some done, one changed file, one duplicate id."""
    key = CacheKey(teacher_hash="b" * 64, outputs={"t": [4]}, views=2)
    c = TeacherCache(tmp_path, key, shard_size=64).open()
    ids = [f"s{i}" for i in range(1300)]
    todo = c.missing([(i, "v1") for i in ids])
    assert len(todo) == 2600 and len(set(todo)) == 2600
    for sid, v in todo:
        if int(sid[1:]) % 3 == 0 or v == 1:
            c.write(sid, v, {"t": np.full(4, int(sid[1:]) + v / 2, np.float32)})
    c.commit()
    again = TeacherCache(tmp_path, key, shard_size=64).open()
    asked = [(i, "v2" if i == "s3" else "v1") for i in ids] + [("s6", "v1")]
    left = again.missing(asked)
    want = [(i, 0) for i in ids if int(i[1:]) % 3] + [("s3", 0), ("s3", 1)]
    assert sorted(left) == sorted(want)
    assert not again.has("s3", 1) and again.has("s6", 1) and again.has("s6", 0)
    assert float(again.read("s299", 1)["t"][0]) == 299.5 and float(again.read("s1299", 1)["t"][0]) == 1300  # fp16


def test_format_1_folder_is_replaced_and_said(tmp_path):
    """A cache written by format 1 (index.json) is deleted when this format builds the same key's cache."""
    key = _key()
    old = tmp_path / key.digest(1)[:16]
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": cache_mod.FORMAT, "version": 1, "key": key.to_dict(1)}))
    (old / "index.json").write_text(json.dumps({"a": {"row": 0, "fp": "fp", "views": [0], "sums": {}}}))
    np.save(old / "tokens.00000.npy", np.zeros((256, 5, 4), np.float16))
    (tmp_path / f"{old.name}.lock").touch()
    c = TeacherCache(tmp_path, key).open()
    assert VERSION > 1 and c.dir != old and not old.exists() and not (tmp_path / f"{old.name}.lock").exists()
    assert c.status.startswith("rebuilt (format v1 folder") and "removed" in c.status
    assert _fill(c, ["a"]) == [("a", 0)]
    assert TeacherCache(tmp_path, key).open().status == "reused"


@pytest.mark.parametrize("damage", ["garbage", "other-digest", "missing"])
def test_malformed_index_is_rebuilt(tmp_path, damage):
    c = TeacherCache(tmp_path, _key()).open()
    _fill(c, ["a", "b"])
    c.close()
    idx = c.dir / "index.sqlite"
    if damage == "garbage":
        idx.write_bytes(b"not a database" * 100)
    elif damage == "other-digest":
        with sqlite3.connect(idx) as db:
            db.execute("UPDATE meta SET v = 'x' WHERE k = 'digest'")
        db.close()
    else:
        idx.unlink()
    again = TeacherCache(tmp_path, _key()).open()
    assert again.status.startswith("rebuilt"), again.status
    assert {"garbage": "unreadable index", "other-digest": "another cache", "missing": "missing"}[damage] in again.status
    assert sorted(_fill(again, ["a", "b"])) == [("a", 0), ("b", 0)]


def test_half_made_shard_without_committed_rows_is_started_afresh(tmp_path):
    """A crash after a new shard file was created but before its rows were committed: the next fill writes it anew."""
    c = TeacherCache(tmp_path, _key(), shard_size=2).open()
    _fill(c, ["a", "b"])  # shard 0 committed
    c.missing([("c", "fp")])
    c.close()
    (c.dir / "tokens.00001.npy").write_bytes(b"\x93NUMPY")  # never committed: no row of shard 1 is published
    again = TeacherCache(tmp_path, _key(), shard_size=2).open()
    assert again.status == "reused"
    assert _fill(again, ["a", "b", "c"]) == [("c", 0)]
    np.testing.assert_array_equal(again.read("c", 0)["tokens"], _teacher("c")["tokens"].astype(np.float16))


# ------------------------------------------------------------------------------------ file hashes
def _counting(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = fp_mod.fingerprint_file
    monkeypatch.setattr(fp_mod, "fingerprint_file", lambda p: calls.append(os.path.basename(p)) or real(p))
    return calls


def _age(path, seconds: float = 100.0) -> None:
    """Date a file back (the record skips files changed in the last `racy_s` seconds)."""
    t = os.stat(path).st_mtime_ns - int(seconds * 1e9)
    os.utime(path, ns=(t, t))


def test_unchanged_files_are_not_read_again_and_rewritten_ones_are(tmp_path, monkeypatch):
    files = [tmp_path / f"f{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    store = FileHashes(tmp_path / "hashes.sqlite", racy_s=0)
    calls = _counting(monkeypatch)
    first = store.hashes(files)
    assert calls == ["f0.bin", "f1.bin", "f2.bin"]
    assert first == [fp_mod.fingerprint_bytes(f.read_bytes()) for f in files]
    calls.clear()
    assert FileHashes(tmp_path / "hashes.sqlite", racy_s=0).hashes(files) == first and calls == []
    # same size, different bytes, new mtime: read again, new hash
    files[1].write_bytes(b"\x07" * 100)
    _age(files[1], 50)  # a new mtime (dated back: recorded files must be older than racy_s)
    second = store.hashes(files)
    assert calls == ["f1.bin"] and second[1] != first[1] and second[0] == first[0]
    # same size, different bytes, the old mtime restored by hand: ctime still tells
    calls.clear()
    st = os.stat(files[2])
    files[2].write_bytes(b"\x09" * 100)
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    third = store.hashes(files)
    assert calls == ["f2.bin"] and third[2] == fp_mod.fingerprint_bytes(b"\x09" * 100)


def test_a_file_changed_just_now_is_not_trusted_and_an_unusable_store_reads_everything(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    calls = _counting(monkeypatch)
    store = FileHashes(tmp_path / "h.sqlite")  # racy_s = 2: x.bin was written just now
    store.hashes([f])
    store.hashes([f])
    assert calls == ["x.bin", "x.bin"]
    (tmp_path / "dir.sqlite").mkdir()  # not a database file: every file is read, nothing fails
    assert FileHashes(tmp_path / "dir.sqlite").hashes([f, f]) == [fp_mod.fingerprint_bytes(b"abc")] * 2
    assert FileHashes(None).hashes([f]) == [fp_mod.fingerprint_bytes(b"abc")]


def test_distill_samples_fingerprint_reads_only_changed_files(tmp_path, monkeypatch):
    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.data.synth import synthesize
    from mirage_edge.distill.data import DistillSamples, open_index

    root = synthesize(tmp_path / "d", "layers", 4, seed=0, size=32)
    index = open_index(root, "seg")
    store = FileHashes(tmp_path / "h.sqlite", racy_s=0)

    def samples() -> DistillSamples:
        return DistillSamples(index, "train", PreprocessSpec(size=(32, 32)), ["bscan"], file_hashes=store)

    calls = _counting(monkeypatch)
    ds = samples()
    fps = [ds.fingerprint(i) for i in range(len(ds))]
    assert len(calls) == len(ds) >= 2
    assert fps[0] == fp_mod.fingerprint_bytes(ds.samples[0].image.read_bytes())  # one file: its bytes' hash
    calls.clear()
    assert [samples().fingerprint(i) for i in range(len(ds))] == fps and calls == []
    img = ds.samples[1].image
    data = bytearray(img.read_bytes())
    data[-1] ^= 0xFF
    img.write_bytes(bytes(data))
    _age(img, 50)
    again = samples()
    assert [again.fingerprint(i) for i in range(len(ds))][1] != fps[1] and calls == [img.name]


# ------------------------------------------------------------------------------------------- int8
@pytest.mark.parametrize("shape", [(7, 16), (3, 2, 9), (5,), ()])
def test_int8_round_trip_error_is_within_half_a_step(shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 300.0], size=shape[:-1] + (1,) if shape else ())).astype(np.float32)
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and q.shape == x.shape and scale.dtype == np.float16 and scale.shape == x.shape[:-1]
    assert np.abs(q.astype(int)).max() <= 127
    back = dequantize_int8(q, scale)
    assert back.dtype == np.float32
    amax = np.abs(x).max(axis=-1) if x.ndim else np.abs(x)
    # half a step of the fp16-rounded-up scale: max|vector| / 254, plus fp16's relative rounding
    bound = (amax / 254 * (1 + 2 ** -9))[..., None] if x.ndim else amax / 254 * (1 + 2 ** -9)
    assert np.all(np.abs(back - x) <= bound + 1e-12)
    z, zs = quantize_int8(np.zeros((2, 4), np.float32))
    assert not z.any() and not dequantize_int8(z, zs).any()
    with pytest.raises(ValueError, match="do not fit"):
        quantize_int8(np.array([1e9], np.float32))


def test_int8_cache_round_trip_key_and_size(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    f16 = TeacherCache(tmp_path, _key(), shard_size=8).open()
    i8 = TeacherCache(tmp_path, _key(dtype="int8"), shard_size=8).open()
    assert i8.dir != f16.dir and i8.status == "new"  # a different dtype is a different cache
    _fill(f16, ids)
    _fill(i8, ids)
    i8.close()
    i8 = TeacherCache(tmp_path, _key(dtype="int8"), shard_size=8).open()
    assert i8.status == "reused" and i8.missing([(i, "fp") for i in ids]) == []
    for sid in ids:
        got = i8.read(sid, 0)
        for n, want in _teacher(sid).items():
            assert got[n].dtype == np.float32 and got[n].shape == want.shape
            amax = np.abs(want).max(axis=-1, keepdims=True)
            assert np.all(np.abs(got[n] - want) <= amax / 254 * (1 + 2 ** -9))
    assert sorted(p.name for p in i8.dir.glob("*.npy")) == ["l0.00000.npy", "l0.scale.00000.npy",
                                                             "tokens.00000.npy", "tokens.scale.00000.npy"]
    assert np.load(i8.dir / "tokens.00000.npy").dtype == np.int8
    assert _key(dtype="int8").row_bytes() == 5 * 4 + 5 * 2 + 3 + 2 and _key().row_bytes() == (20 + 3) * 2
    with pytest.raises(ValueError, match="dtype"):
        _key(dtype="int4")


def test_int8_scales_are_covered_by_the_checksum(tmp_path):
    c = TeacherCache(tmp_path, _key(dtype="int8"), shard_size=2).open()
    _fill(c, ["a", "b"])
    c.close()
    p = c.dir / "tokens.scale.00000.npy"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # row "b"'s last scale, one ulp off
    p.write_bytes(bytes(data))
    again = TeacherCache(tmp_path, _key(dtype="int8"), shard_size=2).open()
    assert "failed their content checksum" in again.status and not again.has("b", 0) and again.has("a", 0)


def test_out_of_range_outputs_are_refused_naming_the_sample(tmp_path):
    for dtype, big in (("float16", 1e5), ("int8", 1e9)):
        c = TeacherCache(tmp_path, _key(dtype=dtype)).open()
        c.missing([("a", "fp")])
        out = _teacher("a")
        out["l0"][1] = big
        with pytest.raises(DataError, match=f"'l0' of sample 'a' view 0.*{dtype if dtype == 'float16' else 'int8'}"):
            c.write("a", 0, out)


def test_recipe_dtype_setting():
    from mirage_edge.distill.recipe import load_recipe
    from mirage_edge.errors import ConfigError

    assert load_recipe("tiny-demo", ['cache.dtype="int8"']).cache.dtype == "int8"
    with pytest.raises(ConfigError, match="cache.dtype"):
        load_recipe("tiny-demo", ['cache.dtype="int4"'])


def test_recipe_dtype_reaches_the_cache_key(tmp_path):
    import torch

    from mirage_edge.data.preprocess import PreprocessSpec
    from mirage_edge.data.synth import synthesize
    from mirage_edge.distill.data import DistillSamples, open_index
    from mirage_edge.distill.loop import attach_cache
    from mirage_edge.distill.recipe import DistillRecipe
    from mirage_edge.distill.teacher import Teacher
    from mirage_edge.models import create_model

    torch.manual_seed(0)
    root = synthesize(tmp_path / "d", "layers", 4, seed=0, size=64)
    teacher = Teacher(create_model("mirage-tiny", input_size=64, depth=1, in_domains=["bscan"], out_domains=[]),
                      ["bscan"], [0])
    recipe = DistillRecipe()
    recipe.cache.dir, recipe.cache.dtype = str(tmp_path / "cache"), "int8"
    ds = DistillSamples(open_index(root, "seg"), "train", PreprocessSpec(size=(64, 64)), ["bscan"],
                        file_hashes=FileHashes(None))
    attach_cache(ds, teacher, recipe, False, lambda m: None)
    assert ds.cache is not None and ds.cache.key.dtype == "int8"


def test_open_shard_maps_are_bounded_without_losing_rows(tmp_path, monkeypatch):
    """Thousands of shards must not hold thousands of file descriptors: old maps are flushed and closed."""
    monkeypatch.setattr(cache_mod, "_MAX_MAPS", 3)
    c = TeacherCache(tmp_path, _key(dtype="int8"), shard_size=2).open()
    ids = [f"s{i}" for i in range(9)]
    todo = c.missing([(i, "fp") for i in ids])
    for k, (sid, v) in enumerate(todo[::2] + todo[1::2]):  # back and forth over 5 shards before one commit
        c.write(sid, v, _teacher(sid))
        assert len(c._maps) <= 3
    c.commit()
    again = TeacherCache(tmp_path, _key(dtype="int8"), shard_size=2).open()
    assert again.status == "reused" and again.missing([(i, "fp") for i in ids]) == []
    for sid in ids:
        np.testing.assert_allclose(again.read(sid, 0)["tokens"], _teacher(sid)["tokens"], atol=0.1)
    assert len(again._maps) <= 3


def test_format_1_folder_in_use_is_left_alone(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    key = _key()
    old = tmp_path / key.digest(1)[:16]
    old.mkdir()
    (old / "index.json").write_text("{}")
    with open(tmp_path / f"{old.name}.lock", "a") as fh:  # a format-1 run is filling it
        fcntl.flock(fh, fcntl.LOCK_EX)
        c = TeacherCache(tmp_path, key).open()
    assert c.status == "new" and old.is_dir()
