"""Local copies of s3:// model and CLIP files (`cluster.artifacts.local_path`), on moto's S3."""

import fcntl
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import boto3
import pytest

from cluster import artifacts
from cluster.errors import ObjectNotFoundError, StorageError
from cluster.storage import S3Store
from rdm.errors import ConfigError

URI = "s3://rdm-unit/models/rdm.safetensors"


@pytest.fixture
def s3(fake_s3, tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    client = boto3.client("s3", region_name="us-east-1")

    def put(data: bytes, key: str = "models/rdm.safetensors") -> None:
        client.put_object(Bucket="rdm-unit", Key=key, Body=data)

    return put


@pytest.fixture
def downloads(monkeypatch):
    """The keys S3Store.download was asked for (it still downloads)."""
    calls, download = [], S3Store.download

    def counted(self, key, path):
        calls.append(key)
        return download(self, key, path)

    monkeypatch.setattr(S3Store, "download", counted)
    return calls


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in (".lock", ".used"))


def test_paths_and_names_pass_through_unchanged():
    assert artifacts.local_path(None) is None
    assert artifacts.local_path("tiny") == "tiny"
    assert artifacts.local_path(Path("/models/x.safetensors")) == "/models/x.safetensors"


def test_an_object_is_downloaded_once_and_again_when_it_changes(s3, downloads, tmp_path):
    s3(b"version one")
    first = artifacts.local_path(URI)
    assert Path(first).read_bytes() == b"version one" and Path(first).name == "rdm.safetensors"
    assert artifacts.local_path(URI) == first and downloads == ["rdm.safetensors"]  # checked, not fetched
    s3(b"version two, longer")
    second = artifacts.local_path(URI)
    assert second != first and Path(second).read_bytes() == b"version two, longer"
    assert len(downloads) == 2
    assert files_under(tmp_path / "cache") == [str(Path(second).relative_to(tmp_path / "cache"))]  # old copy gone


def test_a_missing_object_or_a_uri_without_a_key_is_a_typed_error(s3):
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        artifacts.local_path("s3://rdm-unit/models/none.safetensors")
    for bad in ("s3://rdm-unit", "s3://rdm-unit/", "s3:///x.pt", "s3://rdm-unit/models/"):
        with pytest.raises(StorageError, match="needs a bucket and a key"):
            artifacts.local_path(bad)


def test_a_failed_download_leaves_no_file_and_the_next_call_downloads(s3, monkeypatch, tmp_path):
    s3(b"weights" * 1000)
    download = S3Store.download

    def broken(self, key, path):
        Path(path).write_bytes(b"weig")  # a partial file, then the connection drops
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(S3Store, "download", broken)
    with pytest.raises(StorageError, match="download failed: ConnectionResetError"):
        artifacts.local_path(URI)
    assert files_under(tmp_path / "cache") == []
    monkeypatch.setattr(S3Store, "download", download)
    assert Path(artifacts.local_path(URI)).read_bytes() == b"weights" * 1000


def test_an_object_replaced_during_its_download_is_downloaded_again(s3, monkeypatch):
    s3(b"old")
    download, calls = S3Store.download, []

    def racing(self, key, path):
        calls.append(key)
        download(self, key, path)
        if len(calls) == 1:
            s3(b"new, uploaded while the old one was downloading")

    monkeypatch.setattr(S3Store, "download", racing)
    path = artifacts.local_path(URI)
    assert Path(path).read_bytes() == b"new, uploaded while the old one was downloading" and len(calls) == 2


def test_processes_asking_at_once_download_once(s3, monkeypatch):
    s3(b"weights")
    download, calls = S3Store.download, []

    def slow(self, key, path):
        calls.append(key)
        time.sleep(0.5)
        download(self, key, path)

    monkeypatch.setattr(S3Store, "download", slow)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(artifacts.local_path(URI))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(paths)) == 1 and Path(paths[0]).read_bytes() == b"weights"


def _uri(name: str) -> str:
    return f"s3://rdm-unit/models/{name}.pt"


def _age(path: str, seconds: float) -> None:
    """Marks the copy at `path` as last used `seconds` ago."""
    used = Path(path).parents[1] / artifacts.USED
    os.utime(used, (time.time() - seconds, time.time() - seconds))


def test_a_capped_cache_removes_the_copies_used_longest_ago(s3, downloads, monkeypatch):
    for name in "abc":
        s3(name.encode() * 1000, key=f"models/{name}.pt")
    monkeypatch.setenv(artifacts.MAX_GB_ENV, str(2500 / 2**30))  # room for two copies of 1000 bytes
    a, b = artifacts.local_path(_uri("a")), artifacts.local_path(_uri("b"))
    _age(a, 3000)
    _age(b, 2000)
    c = artifacts.local_path(_uri("c"))  # a goes: used longest ago
    assert not Path(a).exists() and Path(b).exists() and Path(c).read_bytes() == b"c" * 1000
    _age(c, 1000)
    a = artifacts.local_path(_uri("a"))  # downloaded again; b goes
    assert Path(a).read_bytes() == b"a" * 1000 and not Path(b).exists() and Path(c).exists()
    assert len(downloads) == 4
    assert artifacts.local_path(_uri("c")) == c and len(downloads) == 4  # a hit removes nothing


def test_copies_in_use_or_being_downloaded_are_spared(s3, monkeypatch, caplog):
    for name in "abc":
        s3(name.encode() * 1000, key=f"models/{name}.pt")
    monkeypatch.setenv(artifacts.MAX_GB_ENV, str(1500 / 2**30))  # room for one copy
    a, b = artifacts.local_path(_uri("a")), artifacts.local_path(_uri("b"))  # a is spared: used just now
    assert Path(a).exists() and Path(b).exists()
    _age(a, 2000)
    _age(b, 1000)
    with open(Path(a).parents[1] / ".lock", "a") as lock:  # another process is downloading a's URI
        fcntl.flock(lock, fcntl.LOCK_EX)
        with caplog.at_level(logging.WARNING, logger="cluster.artifacts"):
            c = artifacts.local_path(_uri("c"))
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert Path(a).exists() and not Path(b).exists() and Path(c).exists()
    assert "over its 0.00 GiB cap" in caplog.text


def test_a_download_the_disk_cannot_hold_is_refused_unless_old_copies_make_room(s3, monkeypatch, tmp_path):
    s3(b"a" * 1000, key="models/a.pt")
    s3(b"b" * 3000, key="models/b.pt")
    a = artifacts.local_path(_uri("a"))
    cache = tmp_path / "cache"

    def disk(free_besides_cache: int):  # a disk with this much free besides what the cache holds
        def usage(path):
            held = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
            return shutil._ntuple_diskusage(10**6, 0, free_besides_cache - held)
        return usage

    monkeypatch.setattr(artifacts.shutil, "disk_usage", disk(3500))
    with pytest.raises(StorageError, match="needs 0.00 GiB but .* free .*RDM_CACHE_DIR"):  # a was used just now
        artifacts.local_path(_uri("b"))
    assert files_under(cache) == [str(Path(a).relative_to(cache))]
    _age(a, 1000)  # no cap: only as much as the disk needs is removed
    assert Path(artifacts.local_path(_uri("b"))).read_bytes() == b"b" * 3000 and not Path(a).exists()


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_a_bad_cache_cap_is_a_config_error(s3, monkeypatch, value):
    monkeypatch.setenv(artifacts.MAX_GB_ENV, value)
    with pytest.raises(ConfigError, match="RDM_CACHE_MAX_GB must be a positive number"):
        artifacts.local_path(URI)


def test_an_uploaded_model_names_its_content_and_config_without_a_download(s3, downloads, tmp_path):
    from rdm.factory import model_config, model_hash, shipped_weights

    tiny = shipped_weights("tiny")
    artifacts.upload_file(tiny, URI)
    assert artifacts.content_hash(URI) == model_hash(tiny)  # from the sha256 metadata upload_file wrote
    assert artifacts.model_config_at(URI) == model_config(tiny)  # from the header, two ranged reads
    assert downloads == [] and not (tmp_path / "cache").exists()
    assert Path(artifacts.local_path(URI)).read_bytes() == tiny.read_bytes()  # checked against the sha256
    assert artifacts.content_hash("tiny") == model_hash("tiny")  # anything else as model_hash


def test_an_object_without_a_sha256_is_hashed_from_its_copy(s3, downloads):
    from rdm.factory import model_hash, shipped_weights

    tiny = shipped_weights("tiny")
    s3(tiny.read_bytes())  # uploaded by another tool: no metadata
    assert artifacts.content_hash(URI) == model_hash(tiny) and downloads == ["rdm.safetensors"]


def test_a_download_that_does_not_match_its_sha256_is_refused(s3, tmp_path):
    client = boto3.client("s3", region_name="us-east-1")
    client.put_object(Bucket="rdm-unit", Key="models/rdm.safetensors", Body=b"tampered",
                      Metadata={"sha256": "0" * 64})
    with pytest.raises(StorageError, match="does not match the object's sha256"):
        artifacts.local_path(URI)
    assert files_under(tmp_path / "cache") == []


@pytest.mark.parametrize("data, match", [
    (b"not a checkpoint at all", "not a safetensors file"),
    ((10).to_bytes(8, "little") + b"{not json}", "not a safetensors file .its header"),
    ((2).to_bytes(8, "little") + b"{}", "not an rdm-cluster checkpoint"),
])
def test_a_model_config_from_s3_that_is_not_a_checkpoint_is_a_typed_error(s3, data, match):
    from rdm.errors import CheckpointError

    s3(data)
    with pytest.raises(CheckpointError, match=match):
        artifacts.model_config_at(URI)
