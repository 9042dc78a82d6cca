"""Local copies of s3:// model and CLIP files (`cluster.artifacts.local_path`), on moto's S3."""

import threading
import time
from pathlib import Path

import boto3
import pytest

from cluster import artifacts
from cluster.errors import ObjectNotFoundError, StorageError
from cluster.storage import S3Store

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
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".lock")


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
