"""The streaming pipeline without DeepSpeed: plan, exact resume, disjoint ranks, corrupt data, S3."""

from __future__ import annotations

import logging
import shutil
import socket
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lapvqa.config import load_config
from lapvqa.data import build_train_loader, build_val_loader, load_manifest, make_units, stream_units
from lapvqa.data.augment import apply_augment
from lapvqa.data.batch import collate
from lapvqa.data.manifest import DataError, ShardInfo
from lapvqa.data.reader import ErrorLog, iter_tar_samples
from lapvqa.data.transform import Decoded
from lapvqa.storage import open_store
from lapvqa.tokenizer import EOT
from s3_fixtures import moto_endpoint, moto_s3  # noqa: F401  (fixtures)
from train_fixtures import train_shards, write_shards  # noqa: F401  (fixture)


def _cfg(shards: str, **kv):
    args = [f"--data.shards={shards}", "--train.micro_batch_size=4", "--data.shuffle_buffer=8",
            "--data.num_workers=2", "--data.prefetch_factor=2", "--seed=3"]
    return load_config(None, args + [f"--{k.replace('__', '.')}={v}" for k, v in kv.items()])


def _take(loader_state, n):
    loader, state = loader_state
    out, it = [], iter(loader)
    for _ in range(n):
        b = next(it)
        state.update(b.meta)
        out.append(b)
    return out, state


def _all_keys(shards: str, split: str) -> list[str]:
    store, m = load_manifest(shards)
    return [s["__key__"] for sh in m.shards(split) for s in iter_tar_samples(store, sh.name, ErrorLog())]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    # 5 shards of 7, 7, 7, 7, 2 train samples: uneven on purpose
    return write_shards(tmp_path_factory.mktemp("uneven"), {"train": 30, "validate": 11}, per_shard=7)


@pytest.mark.parametrize("n_shards, n_streams", [(1, 4), (3, 4), (5, 2), (8, 3), (4, 4)])
def test_plan_deals_every_sample_once_per_epoch(n_shards, n_streams):
    shards = [ShardInfo(f"s{i}.tar", 10) for i in range(n_shards)]
    units = make_units(shards, n_streams)
    for epoch in range(3):
        seen = Counter()
        for s in range(n_streams):
            mine = stream_units(units, 5, epoch, s, n_streams)
            assert mine, "every stream gets work"
            for u in mine:
                seen.update((u.shard, i) for i in range(10) if u.takes(i))
        assert seen == Counter({(s.name, i): 1 for s in shards for i in range(10)})


def test_collate_pads_with_masks():
    d = [Decoded("a", np.zeros((8, 8), np.uint8), np.array([5, 6, 7])),
         Decoded("b", np.ones((8, 8), np.uint8), np.array([9]))]
    b = collate(d)
    assert b.images.shape == (2, 1, 8, 8) and b.images.dtype == torch.uint8
    assert b.tokens.tolist() == [[EOT, 5, 6, 7, EOT], [EOT, 9, EOT, EOT, EOT]]
    assert b.mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert b.n_target_tokens == 4 + 2


@pytest.mark.timeout(120)
def test_resume_mid_stream_is_exact(uneven):
    """Batches after a restore equal the uninterrupted stream: keys, pixels (augmentation) and
    tokens, across epoch boundaries and with several workers."""
    cfg = _cfg(uneven)
    ref, _ = _take(build_train_loader(cfg, 64, 0, 1), 24)  # 96 samples: > 3 epochs of 30
    for cut in (5, 11):
        head, state = _take(build_train_loader(cfg, 64, 0, 1), cut)
        tail, _ = _take(build_train_loader(cfg, 64, 0, 1, saved=state.state_dict()), 24 - cut)
        for a, b in zip(ref, head + tail):
            assert a.keys == b.keys
            assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
            assert torch.equal(a.aug, b.aug)
    # the augmentation is drawn anew each epoch (same key, new parameters) and changes pixels
    by_key = {}
    for b in ref:
        for k, img, p in zip(b.keys, b.images, b.aug):
            by_key.setdefault(k, []).append((img, p))
    (img, p0), (_, p1) = next(v for v in by_key.values() if len(v) > 1)[:2]
    assert not torch.equal(p0, p1)
    out = apply_augment(img[None], p0[None])
    assert out.shape == (1, 1, 64, 64) and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out, img[None].float() / 255, atol=0.02)
    identity = torch.tensor([[1.0, 0, 0, 0, 1.0, 0]])
    assert torch.allclose(apply_augment(img[None], identity), img[None].float() / 255, atol=1e-5)


@pytest.mark.timeout(120)
def test_resume_refuses_other_topology(uneven):
    cfg = _cfg(uneven)
    _, state = _take(build_train_loader(cfg, 64, 0, 1), 2)
    with pytest.raises(DataError, match="1 ranks x 2 workers; this run has 2 x 2"):
        build_train_loader(cfg, 64, 0, 2, saved=state.state_dict())


@pytest.mark.timeout(120)
def test_ranks_see_disjoint_data_and_equal_steps(uneven):
    """2 ranks x 2 workers = 4 streams over 5 uneven shards: within an epoch no sample is seen
    twice, and every rank keeps producing batches (no rank runs dry at the epoch end)."""
    cfg = _cfg(uneven, data__shuffle_buffer=4)
    per_rank = {r: _take(build_train_loader(cfg, 64, r, 2), 30)[0] for r in (0, 1)}
    seen = Counter()
    for r, batches in per_rank.items():
        assert len(batches) == 30
        for b in batches:
            if b.meta["epoch"] == 0:
                seen.update(b.keys)
    assert seen and max(seen.values()) == 1
    everything = set(_all_keys(uneven, "train"))
    assert set(seen) <= everything and len(everything) == 30


@pytest.mark.timeout(120)
def test_validation_counts_each_sample_once(uneven):
    cfg = _cfg(uneven)
    for world in (1, 2, 3):
        keys = Counter(k for r in range(world) for b in build_val_loader(cfg, 64, r, world) for k in b.keys)
        assert keys == Counter(_all_keys(uneven, "validate"))
    cfg = _cfg(uneven, validate__max_samples=9)
    keys = [k for r in range(2) for b in build_val_loader(cfg, 64, r, 2) for k in b.keys]
    assert sorted(keys) == sorted(_all_keys(uneven, "validate")[:9])


@pytest.mark.timeout(120)
def test_truncated_shard_and_corrupt_sample_are_counted_with_names(uneven, tmp_path, caplog):
    bad = Path(shutil.copytree(uneven, tmp_path / "bad"))
    tar = bad / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # truncated mid-sample
    store = open_store(str(bad))
    errors = ErrorLog()
    with caplog.at_level(logging.WARNING, logger="lapvqa.data"):
        got = list(iter_tar_samples(store, "train-000001.tar", errors))
    assert 0 < len(got) < 7 and errors.count == 1 and errors.shards == ["train-000001.tar"]
    list(iter_tar_samples(store, "train-000001.tar", errors))  # read again (next epoch)
    assert errors.count == 1, "the same damage is counted once"
    assert "train-000001.tar" in caplog.text
    # a sample whose JPEG is garbage: counted at decode time, the batch is filled from the next
    tar0 = bad / "train-000000.tar"
    data = tar0.read_bytes()
    i = data.index(b"\xff\xd8\xff")  # first JPEG's start of image
    tar0.write_bytes(data[:i] + b"\x00" * 64 + data[i + 64:])
    cfg = _cfg(str(bad), data__num_workers=0)
    batches, state = _take(build_train_loader(cfg, 64, 0, 1), 10)  # > one epoch
    assert state.errors == 2 and state.error_shards == ["train-000000.tar", "train-000001.tar"]
    assert all(len(b) == 4 for b in batches)


def _upload(local: str, url: str) -> None:
    store = open_store(url)
    for p in sorted(Path(local).iterdir()):
        if p.is_file():
            store.put_file_atomic(p.name, p)


class _CuttingProxy:
    """TCP proxy in front of moto that breaks the first ``cuts`` connections once they have
    carried ``after`` response bytes: a connection reset in the middle of a shard download."""

    def __init__(self, target: str, after: int, cuts: int):
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target, self.after, self.cuts, self.done = (host, int(port)), after, cuts, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, response):
        sent = 0
        try:
            while chunk := src.recv(65536):
                if response and self.done < self.cuts and sent + len(chunk) > self.after:
                    self.done += 1
                    dst.sendall(chunk[: self.after - sent])
                    raise ConnectionResetError
                dst.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.sock.close()


@pytest.mark.timeout(240)
def test_s3_stream_with_broken_connections_loses_nothing(train_shards, moto_s3, moto_endpoint, monkeypatch):
    """Shards on S3 (moto_server) behind a proxy that resets connections mid-download: the same
    batches as from the local folder, none lost or repeated."""
    _upload(train_shards, moto_s3 + "/shards")
    proxy = _CuttingProxy(moto_endpoint, after=200_000, cuts=3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        local = _take(build_train_loader(_cfg(train_shards), 64, 0, 1), 12)[0]
        remote = _take(build_train_loader(_cfg(moto_s3 + "/shards"), 64, 0, 1), 12)[0]
        val_local = [k for b in build_val_loader(_cfg(train_shards), 64, 0, 1) for k in b.keys]
        val_remote = [k for b in build_val_loader(_cfg(moto_s3 + "/shards"), 64, 0, 1) for k in b.keys]
    finally:
        proxy.close()
    assert proxy.done == 3, "the proxy must really have broken connections"
    assert [b.keys for b in local] == [b.keys for b in remote]
    assert all(torch.equal(a.images, b.images) for a, b in zip(local, remote))
    assert val_local == val_remote and len(set(val_local)) == len(val_local) > 0


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(DataError, match="no manifest.json in"):
        load_manifest(str(tmp_path))


def test_tar_reader_matches_tarfile_and_detects_every_truncation():
    import io
    import tarfile

    from lapvqa.data.reader import TarError, iter_tar_members
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        long = ("dir/" * 30 + "f.txt") if fmt == tarfile.USTAR_FORMAT else "d" * 150 + ".txt"
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in (("a.jpg", b"x" * 1000), (long, b"yy"), ("e.npy", b""), ("big", b"z" * 5000)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            ref = [(m.name, tar.extractfile(m).read()) for m in tar]
        assert list(iter_tar_members(io.BytesIO(data))) == ref
        end = data.rindex(b"z" * 5000) + 5000 + (-5000 % 512)  # where the end marker starts
        for cut in range(0, end + 512, 64):  # includes cuts exactly at member boundaries
            with pytest.raises(TarError):
                list(iter_tar_members(io.BytesIO(data[:cut])))
