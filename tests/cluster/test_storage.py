import pytest

from cluster.errors import ObjectNotFoundError, StorageCredentialsError, StorageError
from cluster.storage import LocalStore, S3Store, open_store


def exercise(store, tmp_path):
    store.write_bytes("a/b.bin", b"one")
    store.write_bytes("a/b.bin", b"two")
    store.write_bytes("c.txt", b"x")
    assert store.read_bytes("a/b.bin") == b"two"
    assert store.exists("a/b.bin") and not store.exists("a/zzz")
    assert store.list() == ["a/b.bin", "c.txt"] and store.list("a") == ["a/b.bin"]
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        store.read_bytes("missing")
    stamps = store.stamps()
    assert sorted(stamps) == store.list() and list(store.stamps("a")) == ["a/b.bin"]
    store.write_bytes("a/b.bin", b"three")  # rewritten: another stamp; the untouched one keeps its own
    assert store.stamps()["a/b.bin"] != stamps["a/b.bin"] and store.stamps()["c.txt"] == stamps["c.txt"]
    store.delete("c.txt")
    assert store.list() == ["a/b.bin"]
    (tmp_path / "up.bin").write_bytes(b"from a file")  # files in and out whole (S3: multipart for large ones)
    store.upload("u/up.bin", tmp_path / "up.bin")
    store.download("u/up.bin", tmp_path / "down.bin")
    assert store.read_bytes("u/up.bin") == (tmp_path / "down.bin").read_bytes() == b"from a file"
    with pytest.raises(ObjectNotFoundError):
        store.download("missing", tmp_path / "nothing.bin")
    store.delete("u/up.bin")
    for name in ("m/1", "m/2", "m/3"):
        store.write_bytes(name, b"x")
    store.delete_many(["m/1", "m/3", "m/never-written"])  # a missing key is no error, as for delete
    store.delete_many([])
    assert store.list("m/") == ["m/2"]
    store.delete("m/2")


def test_local_store(tmp_path):
    store = open_store(tmp_path / "root")
    assert isinstance(store, LocalStore)
    exercise(store, tmp_path)
    assert not list((tmp_path / "root").rglob(".*"))  # no temporary files left behind


def test_s3_store(fake_s3, tmp_path):
    store = open_store("s3://rdm-unit/some/prefix")
    assert isinstance(store, S3Store) and store.uri == "s3://rdm-unit/some/prefix"
    exercise(store, tmp_path)


def test_s3_store_pickles_without_its_client(fake_s3):
    import pickle

    store = open_store("s3://rdm-unit/p")
    store.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone._client is None and clone.read_bytes("k") == b"v"


def test_missing_bucket(fake_s3):
    with pytest.raises(ObjectNotFoundError, match="bucket"):
        open_store("s3://no-such-bucket/x").read_bytes("k")


def test_missing_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("RDM_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageCredentialsError, match="no S3 credentials"):
        open_store("s3://bucket/x").read_bytes("k")


def test_bad_uris():
    with pytest.raises(StorageError, match="needs a bucket"):
        open_store("s3:///x")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        open_store("gs://bucket/x")


def test_errors_survive_pickling():
    """Ray ships exceptions between processes by pickling them."""
    import pickle

    from cluster.errors import CorruptShardError, ShardUnavailableError
    from rdm.errors import IncompatibleCheckpointError

    for err in (CorruptShardError("s3://b/k", "bad checksum"), ShardUnavailableError(3, "timed out"),
                IncompatibleCheckpointError("no fit", missing=["a"], unexpected=["b"])):
        clone = pickle.loads(pickle.dumps(err))
        assert type(clone) is type(err) and str(clone) == str(err)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_conditional_writes_create_once_and_replace_only_what_was_read(where, tmp_path, request):
    """`create` writes only a new key; `replace_if` only over the version read (the tag), so of two writers
    that read the same version one wins (the base of the index's database lock)."""
    if where == "s3":
        request.getfixturevalue("fake_s3")
    store = open_store(str(tmp_path / "store") if where == "local" else "s3://rdm-unit/cond")
    first = store.create("db/LOCK", b"one")
    assert first is not None and store.create("db/LOCK", b"two") is None and store.read_bytes("db/LOCK") == b"one"
    data, tag = store.read_tagged("db/LOCK")
    assert (data, tag) == (b"one", first)
    second = store.replace_if("db/LOCK", b"three", tag)
    assert second is not None and second != first
    assert store.replace_if("db/LOCK", b"four", tag) is None  # the other writer, holding the old tag, loses
    assert store.read_tagged("db/LOCK") == (b"three", second)
    store.delete("db/LOCK")
    assert store.replace_if("db/LOCK", b"five", second) is None and not store.exists("db/LOCK")
    assert store.list("db") == []  # no temporary or guard files show


def test_create_works_on_a_folder_without_hard_links(tmp_path, monkeypatch):
    import errno
    import os

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = LocalStore(tmp_path)
    assert store.create("db/LOCK", b"one") is not None and store.create("db/LOCK", b"two") is None
    assert store.read_bytes("db/LOCK") == b"one" and store.list("db") == ["db/LOCK"]


def test_s3_objects_carry_the_content_type_of_their_name(fake_s3, tmp_path):
    """A presigned URL of a generated image or a job's contact sheet opens in a browser: every write names the
    object's type (S3 otherwise records binary/octet-stream)."""
    import boto3

    store = open_store("s3://rdm-unit/typed")
    store.write_bytes("a.png", b"x")
    store.write_bytes("b.jpg", b"x")
    store.write_bytes("c.webp", b"x")
    store.write_bytes("index.html", b"x")
    store.create("d.json", b"{}")
    store.replace_if("d.json", b"{}", store.read_tagged("d.json")[1])
    store.write_bytes("e.parquet", b"x")
    (tmp_path / "model.txt").write_bytes(b"x")
    store.upload("f.txt", tmp_path / "model.txt")
    client = boto3.client("s3", region_name="us-east-1")
    types = {key: client.head_object(Bucket="rdm-unit", Key=f"typed/{key}")["ContentType"]
             for key in ("a.png", "b.jpg", "c.webp", "index.html", "d.json", "e.parquet", "f.txt")}
    assert types == {"a.png": "image/png", "b.jpg": "image/jpeg", "c.webp": "image/webp", "index.html": "text/html",
                     "d.json": "application/json", "e.parquet": "binary/octet-stream", "f.txt": "text/plain"}


def test_s3_deletes_many_keys_a_batch_to_a_request_and_reports_what_it_could_not(fake_s3, monkeypatch):
    from cluster import storage

    store = open_store("s3://rdm-unit/many")
    for i in range(5):
        store.write_bytes(f"k{i}", b"x")
    calls = []
    real = store.client.delete_objects
    monkeypatch.setattr(store.client, "delete_objects", lambda **kw: calls.append(kw) or real(**kw))
    monkeypatch.setattr(storage, "DELETE_BATCH", 2)
    store.delete_many([f"k{i}" for i in range(5)])
    assert store.list() == [] and [len(c["Delete"]["Objects"]) for c in calls] == [2, 2, 1]
    assert calls[0]["Delete"]["Objects"][0] == {"Key": "many/k0"}
    monkeypatch.setattr(store.client, "delete_objects", lambda **kw: {
        "Errors": [{"Key": "many/k1", "Code": "AccessDenied", "Message": "Access Denied"}]})
    with pytest.raises(StorageError, match="did not delete 1 of 2 objects \\(AccessDenied"):
        store.delete_many(["k0", "k1"])
