"""Object storage behind one small protocol: local folders and S3 (or S3-compatible servers).

URIs are `s3://bucket/prefix/...` or local paths. S3 settings come from the standard AWS environment
(credentials, region, `AWS_ENDPOINT_URL`), plus `RDM_S3_ENDPOINT_URL` to point at an S3-compatible
server such as SeaweedFS or MinIO. Writes are atomic: a reader sees the old object or the new one.

Conditional writes (`create`, `replace_if`) are what locks are built from: on S3 they are the server's
conditional PUTs (`If-None-Match: *`, `If-Match: ETag`; AWS S3, SeaweedFS and MinIO enforce them); on a
folder, a hard link (create) and a check and rename under `flock` (replace), so between processes of
one host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mimetypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from cluster.errors import ObjectNotFoundError, StorageCredentialsError, StorageError

ENDPOINT_ENV = "RDM_S3_ENDPOINT_URL"
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "403"}


@runtime_checkable
class ObjectStore(Protocol):
    """Keys are '/'-separated paths relative to the store's root URI."""

    uri: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def stamps(self, prefix: str = "") -> dict[str, str]: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: list[str]) -> None: ...
    def download(self, key: str, path: str | Path) -> None: ...
    def upload(self, key: str, path: str | Path, metadata: dict[str, str] | None = None) -> None: ...
    def create(self, key: str, data: bytes) -> str | None: ...
    def read_tagged(self, key: str) -> tuple[bytes, str]: ...
    def replace_if(self, key: str, data: bytes, tag: str) -> str | None: ...


class _PreconditionFailed(StorageError):
    """A conditional write found the object other than it required (internal to this module)."""


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class LocalStore:
    """Objects as files under a root folder; writes go through a temporary file and a rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as err:
            raise ObjectNotFoundError(str(self._path(key)), "does not exist") from err
        except OSError as err:
            raise StorageError(str(self._path(key)), f"cannot read: {err}") from err

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            os.replace(self._temporary(path, data), path)
        except OSError as err:
            raise StorageError(str(path), f"cannot write: {err}") from err

    def download(self, key: str, path: str | Path) -> None:
        """Copy the object to the file `path`."""
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError as err:
            if not self._path(key).exists():
                raise ObjectNotFoundError(str(self._path(key)), "does not exist") from err
            raise StorageError(str(path), f"cannot write: {err}") from err
        except OSError as err:
            raise StorageError(str(self._path(key)), f"cannot copy to {path}: {err}") from err

    def upload(self, key: str, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Copy the file `path` to the object `key` (through a temporary file and a rename: whole or not at all;
        files keep no `metadata`)."""
        target, tmp = self._path(key), None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
                shutil.copyfileobj(source, out, 16 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except OSError as err:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise StorageError(str(target), f"cannot write: {err}") from err

    @staticmethod
    def _temporary(path: Path, data: bytes) -> str:
        """A hidden file beside `path` holding `data`, flushed to disk."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, key: str, data: bytes) -> str | None:
        """Write `key` only if it does not exist; its tag, or None if it exists."""
        path = self._path(key)
        try:
            tmp = self._temporary(path, data)
            try:
                os.link(tmp, path)  # atomic, and fails if the name exists
            except FileExistsError:
                return None
            except OSError:  # a file system without hard links: check and rename under the guard
                with self._guard(path):
                    if path.exists():
                        return None
                    os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as err:
            raise StorageError(str(path), f"cannot write: {err}") from err
        return _content_tag(data)

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and its tag (for `replace_if`)."""
        data = self.read_bytes(key)
        return data, _content_tag(data)

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        """Overwrite `key` only if it still has `tag`; the new tag, or None if it changed or is gone."""
        path = self._path(key)
        try:
            with self._guard(path):
                try:
                    if _content_tag(path.read_bytes()) != tag:
                        return None
                except FileNotFoundError:
                    return None
                os.replace(self._temporary(path, data), path)
        except OSError as err:
            raise StorageError(str(path), f"cannot write: {err}") from err
        return _content_tag(data)

    @staticmethod
    @contextlib.contextmanager
    def _guard(path: Path):
        """An exclusive `flock` on a hidden file beside `path`: one conditional replace at a time per host."""
        with open(path.parent / f".{path.name}.guard", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            yield

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.stamps(prefix))

    def stamps(self, prefix: str = "") -> dict[str, str]:
        """{key: stamp} under `prefix`: a stamp changes when the object is rewritten (size and modification
        time here, size and ETag on S3); what `list` lists, from the same listing."""
        base = self._path(prefix)
        if base.is_file():
            files = [base]
        elif base.is_dir():
            files = [p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
        else:
            return {}
        stamps = {}
        for path in files:
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                stat = path.stat()
                stamps[str(path.relative_to(self.root))] = f"{stat.st_size}-{stat.st_mtime_ns}"
        return stamps

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)


DELETE_BATCH = 1000  # keys per S3 DeleteObjects request (S3's most)


class S3Store:
    """Objects under `s3://bucket/prefix`. The boto3 client is created lazily in each process."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = None

    def __getstate__(self) -> dict:
        return {"bucket": self.bucket, "prefix": self.prefix, "uri": self.uri, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _call(self, key: str, method: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        uri = f"s3://{self.bucket}/{self._key(key)}"
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except NoCredentialsError as err:
            raise StorageCredentialsError(uri, "no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                               "or an AWS profile") from err
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise _PreconditionFailed(uri, f"S3 refused a conditional write ({code})") from err
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFoundError(uri, "does not exist") from err
            if code == "NoSuchBucket":
                raise ObjectNotFoundError(uri, f"bucket {self.bucket!r} does not exist") from err
            if code in _CREDENTIAL_CODES:
                raise StorageCredentialsError(uri, f"S3 rejected the credentials ({code})") from err
            raise StorageError(uri, f"S3 error {code}: {err}") from err
        except BotoCoreError as err:
            raise StorageError(uri, f"cannot reach S3: {err}") from err

    def read_bytes(self, key: str) -> bytes:
        return self._call(key, "get_object", Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(key, "put_object", Key=self._key(key), Body=data, **_content_type(key))

    def exists(self, key: str) -> bool:
        try:
            self._call(key, "head_object", Key=self._key(key))
            return True
        except ObjectNotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.stamps(prefix))

    def stamps(self, prefix: str = "") -> dict[str, str]:
        """{key: "size-ETag"} under `prefix`, from the listing (see LocalStore.stamps)."""
        stamps, token, root = {}, None, self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call(prefix, "list_objects_v2", Prefix=root, **extra)
            for obj in page.get("Contents", []):
                key = obj["Key"][strip:]
                if not key.rsplit("/", 1)[-1].startswith("."):
                    stamps[key] = f"{obj['Size']}-{obj['ETag'].strip(chr(34))}"
            if not page.get("IsTruncated"):
                return stamps
            token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self._call(key, "delete_object", Key=self._key(key))

    def delete_many(self, keys: list[str]) -> None:
        """Delete `keys` (a missing one is no error), DELETE_BATCH to a request: a job's thousands of parts in
        seconds, not one round trip each."""
        for start in range(0, len(keys), DELETE_BATCH):
            chunk = keys[start:start + DELETE_BATCH]
            answer = self._call(chunk[0], "delete_objects",
                                Delete={"Objects": [{"Key": self._key(key)} for key in chunk], "Quiet": True})
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(f"s3://{self.bucket}/{first.get('Key', '')}",
                                   f"S3 did not delete {len(errors)} of {len(chunk)} objects "
                                   f"({first.get('Code', '')}: {first.get('Message', '')})")

    def create(self, key: str, data: bytes) -> str | None:
        """Write `key` only if it does not exist (`If-None-Match: *`); its ETag, or None if it exists."""
        try:
            return self._call(key, "put_object", Key=self._key(key), Body=data, IfNoneMatch="*", **_content_type(key))["ETag"]
        except _PreconditionFailed:
            return None

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and its ETag (for `replace_if`)."""
        response = self._call(key, "get_object", Key=self._key(key))
        return response["Body"].read(), response["ETag"]

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        """Overwrite `key` only if its ETag is still `tag` (`If-Match`); the new ETag, or None."""
        try:
            return self._call(key, "put_object", Key=self._key(key), Body=data, IfMatch=tag, **_content_type(key))["ETag"]
        except (_PreconditionFailed, ObjectNotFoundError):
            return None

    def head(self, key: str) -> tuple[int, str, dict[str, str]]:
        """The object's size in bytes, its ETag and its user metadata (`x-amz-meta-*`, names lower-cased)."""
        response = self._call(key, "head_object", Key=self._key(key))
        return int(response["ContentLength"]), response["ETag"], dict(response.get("Metadata") or {})

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object from byte `start` (fewer where it ends sooner)."""
        return self._call(key, "get_object", Key=self._key(key), Range=f"bytes={start}-{start + length - 1}")["Body"].read()

    def download(self, key: str, path: str | Path) -> None:
        """Copy the object to the file `path`, in parallel ranged GETs for large objects (boto3's managed
        transfer, which pins the parts to the ETag it saw first)."""
        self._call(key, "download_file", Key=self._key(key), Filename=str(path), Config=_transfer_config())

    def upload(self, key: str, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Copy the file `path` to the object `key` (with user `metadata`), in parallel parts for large files;
        the object appears whole when the upload completes, or not at all."""
        self._call(key, "upload_file", Key=self._key(key), Filename=str(path), Config=_transfer_config(),
                   ExtraArgs={"Metadata": dict(metadata or {}), **_content_type(key)})

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
                                                  ExpiresIn=expires_s)


def _content_type(key: str) -> dict[str, str]:
    """The object's `ContentType` from its name (`image/png`, `text/html`, `application/json`, ...), so that a
    presigned URL or a bucket browser shows a generated image or a job's contact sheet instead of downloading
    it; nothing for names without a known type (S3 then records binary/octet-stream)."""
    kind, _ = mimetypes.guess_type(key)
    return {"ContentType": kind} if kind else {}


def _transfer_config():
    """boto3's managed transfers for multi-GB files: 64 MiB parts, 8 at a time."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=8)


def _content_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_client():
    """A boto3 S3 client from the standard AWS environment, with RDM_S3_ENDPOINT_URL as an override."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get(ENDPOINT_ENV) or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"},
                    signature_version="s3v4")  # SigV4 presigned URLs work in every region
    # A fresh session per client: the default session caches credentials and is not thread-safe.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def open_store(uri: str | Path) -> ObjectStore:
    """The store rooted at `uri` (`s3://bucket/prefix` or a local folder)."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(text, "an S3 URI needs a bucket: s3://bucket/prefix")
        return S3Store(bucket, prefix)
    if "://" in text and not text.startswith("file://"):
        raise StorageError(text, "unsupported URI scheme; use a local path or s3://bucket/prefix")
    return LocalStore(text.removeprefix("file://"))
