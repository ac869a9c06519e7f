"""One shard job: reuse a verified existing shard, or build the tar and write it atomically.

A shard is built in memory (30-50 MB at the defaults) with fixed tar metadata and member order, so
the bytes depend only on the plan; then it is written atomically (temp + rename locally, a
completed upload on S3), then its sidecar ``_parts/<shard>.json`` (counts, sha256, rejects).
A shard counts as done only when its sidecar exists and matches the shard: a kill at any point
leaves either a finished shard or something the re-run redoes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..storage import Store, open_store
from .config import ShardConfig
from .inputs import Record, ReportSource
from .plan import ShardJob
from .samples import SampleResult, Sources, make_sample, read_inputs

__all__ = ["JobContext", "ShardResult", "run_job", "sidecar_name", "tar_bytes", "PARTS_DIR"]

PARTS_DIR = "_parts"
_TAR_MTIME = 0  # fixed metadata: identical inputs give identical bytes


def sidecar_name(shard: str) -> str:
    return f"{PARTS_DIR}/{shard}.json"


@dataclass
class JobContext:
    """Everything a worker needs besides the job; sent once per worker process."""

    cfg: ShardConfig
    out_url: str
    images_url: str
    reports: ReportSource
    plan_hash: str
    io_threads: int = 4
    resume_check: str = "sha256"


@dataclass
class ShardResult:
    name: str
    split: str
    samples: int
    bytes: int
    sha256: str
    rejects: list[dict]
    warnings: dict[str, int]
    token_lengths: list[int] = field(default_factory=list)
    reused: bool = False
    planned: int = 0

    def sidecar(self, plan_hash: str) -> dict:
        d = {k: getattr(self, k) for k in ("name", "split", "samples", "bytes", "sha256",
                                           "planned", "rejects", "warnings", "token_lengths")}
        d["plan_hash"] = plan_hash
        return d

    @classmethod
    def from_sidecar(cls, d: dict) -> "ShardResult":
        keys = ("name", "split", "samples", "bytes", "sha256", "rejects", "warnings",
                "token_lengths", "planned")
        return cls(**{k: d[k] for k in keys}, reused=True)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, _TAR_MTIME, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """Deterministic tar: samples in the given order, members sorted, fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                tf.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return buf.getvalue()


def _prefetched(src: Sources, records: list[Record], threads: int) -> Iterator[tuple]:
    """Input bytes in record order, read ``threads`` at a time ahead (hides FS/S3 latency)."""
    with ThreadPoolExecutor(max(1, threads)) as ex:
        window: deque = deque()
        it = iter(records)
        for rec in it:
            window.append((rec, ex.submit(read_inputs, src, rec)))
            if len(window) >= 2 * threads:
                break
        while window:
            rec, fut = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append((nxt, ex.submit(read_inputs, src, nxt)))
            yield rec, fut.result()


def _sha256_of(store: Store, name: str) -> str:
    h = hashlib.sha256()
    with store.open_read(name) as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def existing_result(store: Store, job: ShardJob, ctx: JobContext) -> ShardResult | None:
    """The recorded result if the shard on the store is complete and matches this plan."""
    try:
        side = json.loads(store.read_bytes(sidecar_name(job.name)))
    except (FileNotFoundError, ValueError):
        return None
    if side.get("plan_hash") != ctx.plan_hash or side.get("name") != job.name:
        return None
    if side.get("samples") == 0:  # every image rejected: no tar by design
        return ShardResult.from_sidecar(side)
    try:
        if store.size(job.name) != side["bytes"]:
            return None
    except FileNotFoundError:
        return None
    if ctx.resume_check == "sha256" and _sha256_of(store, job.name) != side["sha256"]:
        return None
    return ShardResult.from_sidecar(side)


def _build(job: ShardJob, ctx: JobContext, src: Sources,
           progress: Callable[[int], None]) -> tuple[bytes, ShardResult]:
    rejects: list[dict] = []
    lengths: list[int] = []
    warnings: dict[str, int] = {}

    def samples():
        done = 0
        for rec, inputs in _prefetched(src, job.records, ctx.io_threads):
            res: SampleResult = make_sample(rec, inputs, ctx.cfg)
            for w in res.warnings:
                warnings[w] = warnings.get(w, 0) + 1
            done += 1
            if done % 16 == 0:
                progress(16)
            if res.members is None:
                rejects.append(res.reject)
            else:  # only the tar buffer keeps the bytes
                lengths.append(res.n_tokens)
                yield res.key, res.members
        progress(done % 16)

    data = tar_bytes(samples())
    res = ShardResult(job.name, job.split, len(lengths), len(data),
                      hashlib.sha256(data).hexdigest(), rejects, dict(sorted(warnings.items())),
                      lengths, planned=len(job.records))
    return data, res


_SOURCES: dict = {}
_STORES: dict = {}


def _out_store(url: str) -> Store:
    # One store (one boto3 client: ~0.3 s to create) per process, not one per shard.
    if url not in _STORES:
        _STORES[url] = open_store(url)
    return _STORES[url]


def run_job(job: ShardJob, ctx: JobContext, progress: Callable[[int], None]) -> ShardResult:
    store = _out_store(ctx.out_url)
    store.cleanup_temp(job.name)  # leftovers of a killed earlier attempt at this very shard
    store.cleanup_temp(sidecar_name(job.name))
    done = existing_result(store, job, ctx)
    if done is not None:
        progress(len(job.records))
        return done
    key = (ctx.images_url, ctx.reports.url)
    if key not in _SOURCES:  # one set of readers (zip handle, boto3 client) per process
        _SOURCES.clear()
        _SOURCES[key] = Sources(ctx.images_url, ctx.reports)
    data, res = _build(job, ctx, _SOURCES[key], progress)
    store.delete(sidecar_name(job.name))  # a stale sidecar must never vouch for new bytes
    if res.samples:
        store.write_bytes_atomic(job.name, data)
    else:
        # An empty tar would make a stock WebDataset reader that gets only it fail ("no samples"):
        # such a shard is left out (recorded in its sidecar, absent from the manifest).
        store.delete(job.name)
        res.bytes, res.sha256 = 0, ""
    side = json.dumps(res.sidecar(ctx.plan_hash), sort_keys=True).encode()
    store.write_bytes_atomic(sidecar_name(job.name), side)
    return res
