"""One local-or-S3 object store used by the sharder, the trainer and the tools.

``open_store(url)`` takes a local folder (``/data/shards``, ``file:///data/shards``) or
``s3://bucket/prefix`` and returns a :class:`Store` whose names are ``/``-separated paths relative
to that location. Writes are atomic: a reader sees either nothing or the whole object (local:
temp file in the same folder + fsync + rename; S3: a single PUT or a completed multipart upload,
which S3 only makes visible once complete).

S3 uses the standard boto3 credential/endpoint chain (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, IAM
roles, ...). Nothing here prints or logs credentials. Stores pickle by URL, so they can be sent to
worker processes; each process opens its own boto3 client.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO

__all__ = ["Store", "LocalStore", "S3Store", "StorageError", "open_store", "TEMP_PREFIX"]

# Temp files of atomic local writes: hidden, so shard globs never match them, and named after
# the target so a resumed run can remove exactly its own leftovers.
TEMP_PREFIX = ".tmp."
_MULTIPART_THRESHOLD = 64 * 1024 * 1024
_READ_RETRIES = 5


class StorageError(OSError):
    """A destination/source I/O failure with a one-line, secret-free message."""


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store name {name!r}: use a relative path without '..'")
    return name


class Store:
    """Interface shared by :class:`LocalStore` and :class:`S3Store`."""

    def url(self, name: str) -> str:  # absolute path or s3:// URL of ``name``
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Sorted names (recursive) that start with ``prefix``; temp files excluded."""
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as f:
            return f.read()

    def open_read(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def write_bytes_atomic(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file_atomic(self, name: str, local_path: str | os.PathLike) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing name is not an error."""
        raise NotImplementedError

    def cleanup_temp(self, name: str) -> int:
        """Remove leftovers of interrupted atomic writes of ``name``; returns how many."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url('')!r})"


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()

    def __reduce__(self):
        return (LocalStore, (str(self.root),))

    def _path(self, name: str) -> Path:
        return self.root / _check_name(name) if name else self.root

    def url(self, name: str) -> str:
        return str(self._path(name)) if name else str(self.root)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                if f.startswith(TEMP_PREFIX):
                    continue
                name = f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}"
                if name.startswith(prefix):
                    out.append(name)
        return sorted(out)

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def open_read(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")

    def _atomic(self, name: str, fill) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    fill(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from e

    def write_bytes_atomic(self, name: str, data: bytes) -> None:
        self._atomic(name, lambda f: f.write(data))

    def put_file_atomic(self, name: str, local_path: str | os.PathLike) -> None:
        def copy(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 8 * 1024 * 1024)

        self._atomic(name, copy)

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def cleanup_temp(self, name: str) -> int:
        path = self._path(name)
        if not path.parent.is_dir():
            return 0
        n = 0
        for p in path.parent.glob(f"{TEMP_PREFIX}{path.name}.*"):
            p.unlink(missing_ok=True)
            n += 1
        return n


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; some file systems do not support it, which is fine.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = ""):
        if not bucket:
            raise ValueError("S3 URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = None
        self._lock = threading.Lock()  # boto3 clients are thread-safe; creating one is not

    def __reduce__(self):
        return (S3Store, (self.bucket, self.prefix))

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # Endpoint/credentials: boto3's standard chain (AWS_ENDPOINT_URL, profiles, roles).
                cfg = Config(retries={"max_attempts": 10, "mode": "standard"},
                             connect_timeout=20, read_timeout=120)
                self._client = boto3.session.Session().client("s3", config=cfg)
            return self._client

    def _key(self, name: str) -> str:
        if not name:
            return self.prefix
        _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        key = self._key(name)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def _err(self, what: str, name: str, e: Exception) -> StorageError:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)
        return StorageError(f"cannot {what} {self.url(name)}: {code}")

    def _head(self, name: str):
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._err("stat", name, e) from e
        except Exception as e:  # connection / credential errors
            raise self._err("stat", name, e) from e

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def size(self, name: str) -> int:
        head = self._head(name)
        if head is None:
            raise FileNotFoundError(self.url(name))
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix)
            for page in pages:
                out.extend(o["Key"][len(base):] for o in page.get("Contents", []))
        except Exception as e:
            raise self._err("list", prefix, e) from e
        return sorted(out)

    def open_read(self, name: str) -> BinaryIO:
        size = self.size(name)
        return io.BufferedReader(_S3RangeReader(self, name, size), buffer_size=1024 * 1024)

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD,
                              multipart_chunksize=_MULTIPART_THRESHOLD, use_threads=True)

    def write_bytes_atomic(self, name: str, data: bytes) -> None:
        # A PUT (or a multipart upload, visible only once completed) is atomic on S3.
        try:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(name),
                                       Config=self._transfer_config())
        except Exception as e:
            raise self._err("write", name, e) from e

    def put_file_atomic(self, name: str, local_path: str | os.PathLike) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(name),
                                    Config=self._transfer_config())
        except Exception as e:
            raise self._err("write", name, e) from e

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as e:
            raise self._err("delete", name, e) from e

    def cleanup_temp(self, name: str) -> int:
        """Abort multipart uploads of ``name`` left by a killed writer (they cost storage)."""
        key = self._key(name)
        try:
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
            n = 0
            for up in resp.get("Uploads", []):
                if up["Key"] == key:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                       UploadId=up["UploadId"])
                    n += 1
            return n
        except Exception:
            return 0  # best effort: a lifecycle rule cleans up what this cannot


class _S3RangeReader(io.RawIOBase):
    """Streams an object; a dropped connection resumes with a ranged GET at the same offset."""

    def __init__(self, store: S3Store, name: str, size: int):
        self.store, self.name, self.size, self.pos = store, name, size, 0
        self._body = None

    def readable(self) -> bool:
        return True

    def _open(self):
        rng = f"bytes={self.pos}-"
        resp = self.store.client.get_object(Bucket=self.store.bucket,
                                            Key=self.store._key(self.name), Range=rng)
        self._body = resp["Body"]

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        for attempt in range(_READ_RETRIES + 1):
            try:
                if self._body is None:
                    self._open()
                data = self._body.read(len(buf))
                if not data and self.pos < self.size:
                    raise ConnectionError("stream ended early")
                buf[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except Exception as e:
                self._body = None
                if attempt == _READ_RETRIES:
                    raise self.store._err("read", self.name, e) from e
                time.sleep(min(0.2 * 2 ** attempt, 5.0))
        return 0  # unreachable

    def close(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:
                pass
            self._body = None
        super().close()


def open_store(url: str | os.PathLike) -> Store:
    """``s3://bucket/prefix`` -> :class:`S3Store`; a path or ``file://`` URL -> :class:`LocalStore`."""
    url = str(url)
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return S3Store(bucket, prefix)
    if url.startswith("file://"):
        url = url[7:]
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r}: use a local path or s3://bucket/prefix")
    return LocalStore(url)
