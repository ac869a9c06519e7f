"""The training stream: stages chained per worker, with a position that makes resume exact.

Per stream (one DataLoader worker of one rank), per epoch:
    units (plan.py) -> tar samples (reader.py) -> reservoir shuffle of bytes (shuffle.py)
    -> decode + augment (transform.py) -> batches (batch.py)
Every batch carries ``meta = {stream, epoch, pos, errors_seen}``: ``pos`` counts the
shuffled samples this stream has consumed in ``epoch`` (dropped corrupt ones included). The
training process records the meta of every batch it *consumes* (not what workers prefetched), so
a checkpoint holds, per stream, exactly where the consumed data ends. Resuming replays that
stream's epoch up to ``pos`` without decoding (the shuffle is content-independent, so the replay
is exact), then continues. The DataLoader asks its workers strictly round-robin; the checkpoint
also records which worker was next, and workers are re-labelled so that the same one comes first.
"""

from __future__ import annotations

import hashlib
import logging
import signal
from dataclasses import dataclass, field
from typing import Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lapvqa.config import AugmentSection
from lapvqa.data.batch import Batch, collate
from lapvqa.data.manifest import DataError
from lapvqa.data.plan import Unit, epoch_rng, stream_units
from lapvqa.data.reader import ErrorLog, iter_units
from lapvqa.data.shuffle import reservoir_shuffle
from lapvqa.data.transform import SampleError, decode_sample
from lapvqa.storage import open_store

log = logging.getLogger("lapvqa.data")


@dataclass
class StreamSpec:
    """Everything a worker needs (picklable: sent to worker processes)."""

    url: str
    units: list[Unit]
    seed: int
    rank: int
    world: int
    workers: int  # >= 1 (0 DataLoader workers = one stream in the training process)
    batch_size: int
    image_size: int
    max_tokens: int
    shuffle_buffer: int
    augment: Optional[AugmentSection]
    max_empty_epochs: int = 3
    start: dict = field(default_factory=dict)  # stream id -> {"epoch", "pos", "errors_seen"}
    first_worker: int = 0  # the logical worker whose batch comes first

    @property
    def n_streams(self) -> int:
        return self.world * self.workers


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: launchers (deepspeed, torchrun, srun --signal) send SIGTERM/
    SIGUSR1 to the whole process tree; a worker killed by it would fail the step that should
    write the preemption checkpoint. The training process handles the signal; workers end with it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def fingerprint(units: list[Unit]) -> str:
    text = "\n".join(f"{u.shard}:{u.slice}/{u.n_slices}" for u in units)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TrainStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        self.spec = spec

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.spec.first_worker) % self.spec.workers
        return run_stream(self.spec, self.spec.rank * self.spec.workers + local)


def run_stream(spec: StreamSpec, sid: int) -> Iterator[Batch]:
    start = spec.start.get(sid) or {}
    epoch, skip = int(start.get("epoch", 0)), int(start.get("pos", 0))
    # Errors already counted before the checkpoint are in ``seen``: replaying does not recount them.
    errors = ErrorLog(start.get("errors_seen", []), where=f" (rank {spec.rank} stream {sid})")
    store, pending, empty = open_store(spec.url), [], 0
    while True:
        units = stream_units(spec.units, spec.seed, epoch, sid, spec.n_streams)
        shuffled = reservoir_shuffle(iter_units(store, units, errors), spec.shuffle_buffer,
                                     epoch_rng(spec.seed, 0x5F, epoch, sid))
        n = 0
        for idx, raw in enumerate(shuffled):
            n += 1
            if idx < skip:
                continue
            try:
                rng = epoch_rng(spec.seed, 0xA6, epoch, sid, idx)
                pending.append(decode_sample(raw, spec.image_size, spec.max_tokens, spec.augment, rng))
            except SampleError as e:
                errors.add(raw["__shard__"], raw["__key__"], f"sample {raw['__key__']!r}: {e}")
            if len(pending) == spec.batch_size:
                yield collate(pending, {"stream": sid, "epoch": epoch, "pos": idx + 1,
                                        "errors_seen": list(errors.seen)})
                pending = []
        empty = 0 if n else empty + 1
        if empty >= spec.max_empty_epochs:
            raise DataError(f"stream {sid} of rank {spec.rank} got no readable sample in {empty} "
                            f"epochs in a row (shards: {', '.join(u.shard for u in units)})")
        epoch, skip = epoch + 1, 0


class DataState:
    """What the training process has consumed, per stream of this rank (saved in checkpoints)."""

    def __init__(self, spec: StreamSpec, units_fp: str):
        self.spec, self.units_fp = spec, units_fp
        self.streams = {int(k): dict(v) for k, v in spec.start.items()}
        self.next_worker = spec.first_worker
        self.manifest_sha256 = ""  # set by build_train_loader; provenance, not stream position

    def update(self, meta: dict) -> None:
        sid = meta["stream"]
        self.streams[sid] = {k: meta[k] for k in ("epoch", "pos", "errors_seen")}
        self.next_worker = (sid - self.spec.rank * self.spec.workers + 1) % self.spec.workers

    @property
    def errors(self) -> int:
        return sum(len(s["errors_seen"]) for s in self.streams.values())

    @property
    def error_shards(self) -> list[str]:
        return sorted({e.split("|", 1)[0] for s in self.streams.values() for e in s["errors_seen"]})

    def state_dict(self) -> dict:
        return {"version": 1, "rank": self.spec.rank, "world_size": self.spec.world,
                "workers": self.spec.workers, "units": self.units_fp, "seed": self.spec.seed,
                "next_worker": self.next_worker,
                "streams": {str(k): v for k, v in sorted(self.streams.items())}}


def check_resumable(saved: dict, spec: StreamSpec, units_fp: str) -> None:
    """Refuse (clearly) to resume a data stream onto a different topology or shard set."""
    if saved.get("version") != 1:
        raise DataError(f"checkpoint data_state version {saved.get('version')!r} is not 1")
    if (saved["world_size"], saved["workers"]) != (spec.world, spec.workers):
        raise DataError(
            f"the checkpoint's data stream was written by {saved['world_size']} ranks x "
            f"{saved['workers']} workers; this run has {spec.world} x {spec.workers}. Exact resume "
            f"needs the same topology: relaunch with {saved['world_size']} ranks and "
            f"data.num_workers={saved['workers'] if saved['workers'] > 0 else 0}, or start a new run.dir")
    if saved["units"] != units_fp:
        raise DataError("the train shards listed in manifest.json changed since the checkpoint "
                        "(different shard set): resume with the original data.shards or start a new run.dir")
    if saved.get("seed") != spec.seed:
        raise DataError(f"seed changed ({saved.get('seed')} -> {spec.seed}); resume with the same seed")


def make_train_loader(spec: StreamSpec, num_workers: int, prefetch_factor: int, pin_memory: bool,
                      saved: Optional[dict] = None) -> tuple[DataLoader, DataState]:
    """An infinite DataLoader of Batches for this rank, positioned after ``saved`` (rank state)."""
    fp = fingerprint(spec.units)
    if saved is not None:
        check_resumable(saved, spec, fp)
        spec.start = {int(k): v for k, v in saved["streams"].items()}
        spec.first_worker = int(saved["next_worker"])
    kwargs = dict(num_workers=num_workers, batch_size=None, pin_memory=pin_memory)
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=ignore_stop_signals)
    return DataLoader(TrainStream(spec), **kwargs), DataState(spec, fp)
