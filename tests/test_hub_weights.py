"""Official weights the way their authors ship them (issue #22 item 1): the Hugging Face repos
j-morano/MIRAGE-{Base,Large} through huggingface_hub (pinned revision, its cache, HF_HUB_OFFLINE), the
release .pth as the fallback, SHA-256 checks, and the hash of what was loaded in the record.

Nothing here touches the network: hub caches are built in tmp_path in the layout huggingface_hub
reads (models--owner--name/{blobs,snapshots,refs}), and the online paths monkeypatch hf_hub_download."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from mirage_edge.errors import (CheckpointError, MissingDependencyError, WeightsChecksumError,
                                WeightsNotFoundError)
from mirage_edge.models.config import HUB_REVISION, PRETRAINED_CFGS
from mirage_edge.models.weights import resolve

hf = pytest.importorskip("huggingface_hub")
hf_constants = pytest.importorskip("huggingface_hub.constants")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT,
              revision: str | None = HUB_REVISION) -> Path:
    """A huggingface_hub cache holding `files` of `repo` at `commit` (refs/<revision> -> commit).

    Blobs are named as the hub names them: the LFS sha256 of weights, the git blob id of small files.
    Returns the snapshot folder."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = _git_sha1(data) if name.endswith(".json") else _sha256(data)
        (repo_dir / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    if revision is not None and revision != commit:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit)
    return snap


def _hub_files(mirage_ref: Path, size: str = "base", weights: str = "model.safetensors") -> dict[str, bytes]:
    """The tiny fixture in the authors' layout, its config naming the official size it stands in for."""
    cfg = json.loads((mirage_ref / "tiny_hf" / "config.json").read_text()) | {"size": size}
    data = (mirage_ref / "tiny_hf" / "model.safetensors").read_bytes()
    if weights == "pytorch_model.bin":  # what older PyTorchModelHubMixin versions wrote
        from safetensors.torch import load_file

        bio = io.BytesIO()
        torch.save(load_file(mirage_ref / "tiny_hf" / "model.safetensors"), bio)
        data = bio.getvalue()
    return {"config.json": json.dumps(cfg, indent=2, sort_keys=True).encode(), weights: data}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Empty MIRAGE_EDGE_HOME and hub cache, offline by default, and no release download."""
    monkeypatch.setenv("MIRAGE_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MIRAGE_EDGE_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # the library refuses the network too

    real = torch.hub.download_url_to_file

    def local_only(url, dst, *a, **k):  # the release "downloads" of these tests are file:// copies
        if not url.startswith("file:"):
            raise AssertionError(f"tried to download {url}")
        return real(url, dst, *a, **k)

    monkeypatch.setattr(torch.hub, "download_url_to_file", local_only)
    return tmp_path


def _go_online(monkeypatch, fake_download):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hf, "hf_hub_download", fake_download)


def _raise(exc: Exception):
    def fail(*args, **kwargs):
        raise exc
    return fail


def _replace_cfg(monkeypatch, name: str, **changes) -> None:
    monkeypatch.setitem(PRETRAINED_CFGS, name, dataclasses.replace(PRETRAINED_CFGS[name], **changes))


# --------------------------------------------------------------------------- the hub cache, offline
def test_offline_resolution_from_a_populated_hub_cache(isolated, mirage_ref):
    files = _hub_files(mirage_ref)
    snap = hub_cache(isolated / "hub", "j-morano/MIRAGE-Base", files)
    found = resolve("mirage-base")
    assert found.path == snap
    rec = found.record
    assert rec["source"] == "hub" and rec["repo"] == "j-morano/MIRAGE-Base" and rec["commit"] == COMMIT
    assert rec["revision"] == HUB_REVISION
    assert rec["file_sha256"] == rec["sha256"]["model.safetensors"] == _sha256(files["model.safetensors"])
    assert rec["checked"] == {"config.json": "hub", "model.safetensors": "hub"}  # the hub's published hashes

    # the snapshot loads through the hf:<dir> loader; the record travels with the model into the run
    from mirage_edge.distill.teacher import Teacher
    from mirage_edge.models import create_model

    tiny = mirage_ref / "tiny_config.json"
    model = create_model("mirage", checkpoint="mirage-base", config=tiny)
    ref = create_model("mirage", checkpoint=f"hf:{mirage_ref / 'tiny_hf'}", config=tiny)
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    described = Teacher(model, ["bscan"]).describe()
    assert described["weights_file"]["file_sha256"] == _sha256(files["model.safetensors"])
    assert described["weights_file"]["commit"] == COMMIT
    json.dumps(described)  # goes into report.json and the student's config.json


def test_weights_placed_by_hand_come_first(isolated, mirage_ref):
    hub_cache(isolated / "hub", "j-morano/MIRAGE-Base", _hub_files(mirage_ref))
    placed = isolated / "home" / "MIRAGE-Base.pth"
    placed.parent.mkdir()
    placed.write_bytes((mirage_ref / "tiny_official.pth").read_bytes())
    found = resolve("mirage-base")
    assert found.path == placed and found.record["source"] == "home"
    assert found.record["file_sha256"] == _sha256(placed.read_bytes())
    assert found.record["checked"] == {"MIRAGE-Base.pth": "none"}  # the release publishes no checksum


def test_older_snapshot_with_pytorch_model_bin(isolated, mirage_ref):
    files = _hub_files(mirage_ref, weights="pytorch_model.bin")
    snap = hub_cache(isolated / "hub", "j-morano/MIRAGE-Large", files, revision=HUB_REVISION)
    (snap / "config.json").unlink()  # the size must match the name: large
    cfg = json.loads(files["config.json"]) | {"size": "large"}
    blob = json.dumps(cfg).encode()
    (snap.parent.parent / "blobs" / _git_sha1(blob)).write_bytes(blob)
    (snap / "config.json").symlink_to(Path("..") / ".." / "blobs" / _git_sha1(blob))
    found = resolve("mirage-large")
    assert found.path == snap and found.record["file_sha256"] == _sha256(files["pytorch_model.bin"])
    from mirage_edge.models import create_model

    tiny = mirage_ref / "tiny_config.json"
    model = create_model("mirage", checkpoint="mirage-large", config=tiny)
    ref = create_model("mirage", checkpoint=f"hf:{mirage_ref / 'tiny_hf'}", config=tiny)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_snapshot_of_another_size_is_refused(isolated, mirage_ref):
    hub_cache(isolated / "hub", "j-morano/MIRAGE-Base", _hub_files(mirage_ref, size="large"))
    with pytest.raises(CheckpointError, match="says size 'large', expected 'base'"):
        resolve("mirage-base")


# --------------------------------------------------------------------------- the pinned revision
def test_the_revision_passed_is_the_pinned_one(isolated, monkeypatch, mirage_ref):
    folder = isolated / "plain"
    folder.mkdir()
    for name, data in _hub_files(mirage_ref).items():
        (folder / name).write_bytes(data)
    calls = []

    def fake(repo_id, filename, **kw):
        calls.append(dict(kw, repo_id=repo_id, filename=filename))
        return str(folder / filename)

    _go_online(monkeypatch, fake)
    found = resolve("mirage-base")
    assert found.path == folder and [c["filename"] for c in calls] == ["config.json", "model.safetensors"]
    assert {c["repo_id"] for c in calls} == {"j-morano/MIRAGE-Base"}
    assert {c["revision"] for c in calls} == {PRETRAINED_CFGS["mirage-base"].hf_revision} == {HUB_REVISION}
    assert {c["local_files_only"] for c in calls} == {False}
    assert {c["cache_dir"] for c in calls} == {str(isolated / "hub")}
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: only the cache is read
    resolve("mirage-base")
    assert {c["local_files_only"] for c in calls} == {True}


def test_a_commit_pin_reads_its_snapshot(isolated, monkeypatch, mirage_ref):
    """Pinning a commit id (no refs/ entry needed) resolves that snapshot, not another one."""
    _replace_cfg(monkeypatch, "mirage-base", hf_revision=COMMIT)
    other = "f" * 40
    hub_cache(isolated / "hub", "j-morano/MIRAGE-Base", _hub_files(mirage_ref), commit=other, revision="main")
    with pytest.raises(WeightsNotFoundError, match="put the weights at"):
        resolve("mirage-base")  # `main` points elsewhere: the pinned commit is not cached
    snap = hub_cache(isolated / "hub", "j-morano/MIRAGE-Base", _hub_files(mirage_ref), revision=None)
    assert resolve("mirage-base").path == snap


# --------------------------------------------------------------------------- SHA-256 checks
def test_a_sha256_mismatch_is_refused(isolated, monkeypatch, mirage_ref):
    files = _hub_files(mirage_ref)
    hub_cache(isolated / "hub", "j-morano/MIRAGE-Base", files)
    good = _sha256(files["model.safetensors"])
    # a hash in our table: checked, and a wrong file is refused naming both hashes
    _replace_cfg(monkeypatch, "mirage-base", hf_sha256={"model.safetensors": good})
    assert resolve("mirage-base").record["checked"]["model.safetensors"] == "known"
    _replace_cfg(monkeypatch, "mirage-base", hf_sha256={"model.safetensors": "0" * 64})
    with pytest.raises(WeightsChecksumError, match=f"SHA-256 mismatch for .*got {good}, expected 0000"):
        resolve("mirage-base")
    with pytest.raises(WeightsChecksumError):  # the loaders refuse it too
        from mirage_edge.models import create_model

        create_model("mirage", checkpoint="mirage-base", config=mirage_ref / "tiny_config.json")


def test_an_altered_file_in_the_hub_cache_is_refused(isolated, mirage_ref):
    files = _hub_files(mirage_ref)
    snap = hub_cache(isolated / "hub", "j-morano/MIRAGE-Base", files)
    blob = (snap / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # same size, one weight changed
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsChecksumError, match="the hash the hub published"):
        resolve("mirage-base")


def test_a_hand_placed_release_file_with_a_known_hash_is_checked(isolated, monkeypatch, mirage_ref):
    placed = isolated / "home" / "MIRAGE-Base.pth"
    placed.parent.mkdir()
    placed.write_bytes((mirage_ref / "tiny_official.pth").read_bytes())
    _replace_cfg(monkeypatch, "mirage-base", sha256="1" * 64)
    with pytest.raises(WeightsChecksumError, match="MIRAGE-Base.pth: SHA-256 mismatch"):
        resolve("mirage-base")
    _replace_cfg(monkeypatch, "mirage-base", sha256=_sha256(placed.read_bytes()))
    assert resolve("mirage-base").record["checked"] == {"MIRAGE-Base.pth": "known"}


# --------------------------------------------------------------------------- offline, nothing cached
def test_hf_hub_offline_with_nothing_cached_says_where_to_put_the_weights(isolated):
    from mirage_edge.models import create_model

    with pytest.raises(WeightsNotFoundError) as err:
        create_model("mirage-large", pretrained=True)
    msg = str(err.value)
    assert "put the weights at" in msg and str(isolated / "home" / "MIRAGE-Large.pth") in msg
    assert "HF_HUB_OFFLINE=1" in msg and "j-morano/MIRAGE-Large" in msg  # what was looked at, why no more


def test_the_teacher_offline_says_where_to_put_the_weights(isolated):
    from mirage_edge.distill.teacher import load_teacher

    with pytest.raises(WeightsNotFoundError, match="put the weights at .*--random-teacher"):
        load_teacher("mirage-base")


# --------------------------------------------------------------------------- the release fallback
def _serve_release(monkeypatch, isolated, mirage_ref, sha256: str | None):
    """The release URL is a file:// copy of the tiny .pth, fetched by the real torch.hub downloader."""
    src = isolated / "release" / "MIRAGE-Base.pth"
    src.parent.mkdir()
    src.write_bytes((mirage_ref / "tiny_official.pth").read_bytes())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online (the hub itself is faked by each test)
    _replace_cfg(monkeypatch, "mirage-base", url=src.as_uri(), sha256=sha256)
    return src


def test_the_release_pth_is_the_fallback_when_the_hub_fails(isolated, monkeypatch, mirage_ref):
    src = _serve_release(monkeypatch, isolated, mirage_ref, sha256=None)
    tried = []

    def hub_down(repo_id, filename, **kw):
        tried.append((repo_id, filename, kw["revision"]))
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(hf, "hf_hub_download", hub_down)
    found = resolve("mirage-base")
    assert tried == [("j-morano/MIRAGE-Base", "config.json", HUB_REVISION)]
    dest = isolated / "home" / "MIRAGE-Base.pth"
    assert found.path == dest and dest.read_bytes() == src.read_bytes()
    assert found.record["source"] == "release" and found.record["url"] == src.as_uri()
    assert found.record["file_sha256"] == _sha256(src.read_bytes())
    assert found.record["checked"] == {"MIRAGE-Base.pth": "none"}  # no published checksum: recorded only
    assert resolve("mirage-base").record["source"] == "home"  # next time: found where it was put


def test_a_release_download_with_the_wrong_hash_is_discarded(isolated, monkeypatch, mirage_ref):
    _serve_release(monkeypatch, isolated, mirage_ref, sha256="2" * 64)
    monkeypatch.setattr(hf, "hf_hub_download", _raise(ConnectionError("down")))
    with pytest.raises(WeightsChecksumError, match="SHA-256 mismatch"):
        resolve("mirage-base")
    assert not (isolated / "home" / "MIRAGE-Base.pth").exists()


def test_when_hub_and_release_both_fail_the_error_says_both_and_where(isolated, monkeypatch, mirage_ref):
    _serve_release(monkeypatch, isolated, mirage_ref, sha256=None)
    _replace_cfg(monkeypatch, "mirage-base", url=(isolated / "nowhere.pth").as_uri())
    monkeypatch.setattr(hf, "hf_hub_download", _raise(ConnectionError("hub down")))
    with pytest.raises(WeightsNotFoundError) as err:
        resolve("mirage-base")
    msg = str(err.value)
    assert "ConnectionError: hub down" in msg and "could not download" in msg and "put the weights at" in msg


def test_without_huggingface_hub_the_error_names_the_extra(isolated, monkeypatch, mirage_ref):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(WeightsNotFoundError) as err:  # offline: nothing else could have been tried
        resolve("mirage-large")
    assert 'pip install "mirage-edge[hub]"' in str(err.value) and "put the weights at" in str(err.value)
    _serve_release(monkeypatch, isolated, mirage_ref, sha256=None)
    assert resolve("mirage-base").record["source"] == "release"  # online: the release still works
    (isolated / "home" / "MIRAGE-Base.pth").unlink()
    _replace_cfg(monkeypatch, "mirage-base", url=(isolated / "nowhere.pth").as_uri())
    with pytest.raises(MissingDependencyError, match=r"huggingface_hub is not installed.*\[hub\]"):
        resolve("mirage-base")


def test_an_export_of_resolved_weights_records_their_hash(isolated, mirage_ref):
    """An artifact exported from a model with resolved weights names their SHA-256 (checkpoint_sha256)."""
    from mirage_edge.export.api import _default_source
    from mirage_edge.models import create_model

    files = _hub_files(mirage_ref)
    hub_cache(isolated / "hub", "j-morano/MIRAGE-Base", files)
    model = create_model("mirage", checkpoint="mirage-base", config=mirage_ref / "tiny_config.json")
    assert _default_source(model).checkpoint_sha256 == _sha256(files["model.safetensors"])
