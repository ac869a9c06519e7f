"""lapvqa.storage: the same behaviour locally and on S3 (moto_server), atomicity, resumed reads."""

from __future__ import annotations

import os
import pickle

import pytest

from lapvqa.storage import LocalStore, S3Store, StorageError, open_store
from s3_fixtures import moto_endpoint, moto_s3  # noqa: F401  (pytest fixtures)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "out"))
    return open_store(request.getfixturevalue("moto_s3") + "/some/prefix")


@pytest.mark.timeout(120)
def test_round_trip_list_size_delete(store):
    assert not store.exists("a.bin") and store.list() == []
    store.write_bytes_atomic("a.bin", b"hello")
    store.write_bytes_atomic("sub/b.bin", b"x" * 3000)
    assert store.exists("a.bin") and store.size("sub/b.bin") == 3000
    assert store.read_bytes("a.bin") == b"hello"
    assert store.list() == ["a.bin", "sub/b.bin"]
    assert store.list("sub/") == ["sub/b.bin"]
    with store.open_read("sub/b.bin") as f:
        assert f.read(10) == b"x" * 10 and len(f.read()) == 2990
    store.write_bytes_atomic("a.bin", b"replaced")
    assert store.read_bytes("a.bin") == b"replaced"
    store.delete("a.bin")
    store.delete("a.bin")  # missing is fine
    assert not store.exists("a.bin") and store.list() == ["sub/b.bin"]
    assert pickle.loads(pickle.dumps(store)).read_bytes("sub/b.bin") == b"x" * 3000


@pytest.mark.timeout(120)
def test_put_file_atomic_and_url(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    store.put_file_atomic("dir/file.bin", src)
    assert store.read_bytes("dir/file.bin") == src.read_bytes()
    url = store.url("dir/file.bin")
    assert url.endswith("dir/file.bin")
    assert url.startswith("s3://") == isinstance(store, S3Store)


def test_missing_and_bad_names(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope")
    with pytest.raises(FileNotFoundError):
        store.size("nope")
    for bad in ("../x", "/abs", "a//b", "a/./b"):
        with pytest.raises(ValueError):
            store.write_bytes_atomic(bad, b"")
    with pytest.raises(ValueError):
        open_store("gs://bucket/x")
    assert isinstance(open_store("file://" + str(tmp_path)), LocalStore)


def test_local_failed_write_leaves_nothing(tmp_path):
    store = open_store(tmp_path)

    def boom(_f):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store._atomic("x.tar", boom)
    assert os.listdir(tmp_path) == []
    # A leftover of a kill -9 (no except clause ran) is hidden from list() and cleaned on request.
    (tmp_path / ".tmp.x.tar.123.abcd").write_bytes(b"partial")
    assert store.list() == [] and store.cleanup_temp("x.tar") == 1
    assert os.listdir(tmp_path) == []


def test_local_destination_error_is_one_line(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    store = open_store(tmp_path / "file" / "sub")  # parent is a file: cannot mkdir
    with pytest.raises(StorageError) as e:
        store.write_bytes_atomic("a", b"1")
    assert "\n" not in str(e.value) and "cannot write" in str(e.value)


@pytest.mark.timeout(120)
def test_s3_read_resumes_after_dropped_connection(moto_s3):
    store = open_store(moto_s3 + "/p")
    data = os.urandom(3 * 1024 * 1024)
    store.write_bytes_atomic("big.bin", data)
    f = store.open_read("big.bin")
    raw = f.raw
    first = f.read(1000)
    # Break the underlying HTTP stream: the reader must reopen at the same offset (Range GET).
    raw._body.close()
    raw._body = _Broken()
    rest = f.read()
    assert first + rest == data


class _Broken:
    def read(self, n):
        raise ConnectionResetError("connection reset by peer")

    def close(self):
        pass


@pytest.mark.timeout(120)
def test_s3_errors_are_clear_and_secret_free(moto_s3, monkeypatch):
    store = open_store("s3://no-such-bucket-xyz/p")
    with pytest.raises(StorageError) as e:
        store.write_bytes_atomic("a", b"1")
    msg = str(e.value)
    assert "s3://no-such-bucket-xyz/p/a" in msg and "testing" not in msg and "\n" not in msg
    assert open_store(moto_s3).cleanup_temp("nothing") == 0
