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

After an elastic resume (another number of ranks or workers, lapvqa/data/elastic.py), a stream
may first *carry* segments of the old topology's streams: ``[n_streams, stream, epoch, pos]``,
the rest of an old stream's epoch replayed under the old deal (same units, shuffle and
augmentation draws), before its own epochs start. The meta then also lists the segments left.
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
    start: dict = field(default_factory=dict)  # stream id -> {"epoch", "pos", "errors_seen", "segments"}
    first_worker: int = 0  # the logical worker whose batch comes first
    other_units: dict = field(default_factory=dict)  # n_streams -> units of an earlier topology

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


def _shuffled(spec: StreamSpec, store, errors: ErrorLog, units: list[Unit], n_streams: int,
              sid: int, epoch: int):
    """(index, raw sample) of one stream's epoch under the deal of ``n_streams`` streams."""
    mine = stream_units(units, spec.seed, epoch, sid, n_streams)
    return enumerate(reservoir_shuffle(iter_units(store, mine, errors), spec.shuffle_buffer,
                                       epoch_rng(spec.seed, 0x5F, epoch, sid)))


def _decode(spec: StreamSpec, raw: dict, sid: int, epoch: int, idx: int, errors: ErrorLog):
    try:
        rng = epoch_rng(spec.seed, 0xA6, epoch, sid, idx)
        return decode_sample(raw, spec.image_size, spec.max_tokens, spec.augment, rng)
    except SampleError as e:
        errors.add(raw["__shard__"], raw["__key__"], f"sample {raw['__key__']!r}: {e}")
        return None


def run_stream(spec: StreamSpec, sid: int) -> Iterator[Batch]:
    start = spec.start.get(sid) or {}
    epoch, pos = int(start.get("epoch", 0)), int(start.get("pos", 0))
    carried = [[int(x) for x in seg] for seg in start.get("segments", [])]
    # Errors already counted before the checkpoint are in ``seen``: replaying does not recount them.
    errors = ErrorLog(start.get("errors_seen", []), where=f" (rank {spec.rank} stream {sid})")
    store, pending, empty = open_store(spec.url), [], 0

    def batch() -> Batch:
        meta = {"stream": sid, "epoch": epoch, "pos": pos, "errors_seen": list(errors.seen)}
        if carried:
            meta["segments"] = [list(seg) for seg in carried]
        return collate(pending, meta)

    while carried:  # an old topology's unfinished epochs first (elastic resume)
        n_streams, old, old_epoch, skip = carried[0]
        for idx, raw in _shuffled(spec, store, errors, spec.other_units[n_streams], n_streams, old, old_epoch):
            if idx < skip:
                continue
            carried[0][3] = idx + 1
            if (sample := _decode(spec, raw, old, old_epoch, idx, errors)) is not None:
                pending.append(sample)
            if len(pending) == spec.batch_size:
                yield batch()
                pending = []
        carried.pop(0)
    while True:
        n, skip = 0, pos
        for idx, raw in _shuffled(spec, store, errors, spec.units, spec.n_streams, sid, epoch):
            n += 1
            if idx < skip:
                continue
            pos = idx + 1
            if (sample := _decode(spec, raw, sid, epoch, idx, errors)) is not None:
                pending.append(sample)
            if len(pending) == spec.batch_size:
                yield batch()
                pending = []
        empty = 0 if n else empty + 1
        if empty >= spec.max_empty_epochs:
            units = stream_units(spec.units, spec.seed, epoch, sid, spec.n_streams)
            raise DataError(f"stream {sid} of rank {spec.rank} got no readable sample in {empty} "
                            f"epochs in a row (shards: {', '.join(u.shard for u in units)})")
        epoch, pos = epoch + 1, 0


class DataState:
    """What the training process has consumed, per stream of this rank (saved in checkpoints)."""

    def __init__(self, spec: StreamSpec, units_fp: str):
        self.spec, self.units_fp = spec, units_fp
        self.streams = {int(k): dict(v) for k, v in spec.start.items()}
        self.next_worker = spec.first_worker
        self.manifest_sha256 = ""  # set by build_train_loader; provenance, not stream position
        # errors an elastic re-deal handed over: remembered (never recounted), but they were
        # found under the old topology's per-rank data.max_errors and do not count against ours
        self.inherited = 0

    def update(self, meta: dict) -> None:
        sid = meta["stream"]
        self.streams[sid] = {k: meta[k] for k in ("epoch", "pos", "errors_seen")}
        if meta.get("segments"):
            self.streams[sid]["segments"] = meta["segments"]
        self.next_worker = (sid - self.spec.rank * self.spec.workers + 1) % self.spec.workers

    @property
    def errors(self) -> int:
        return sum(len(s["errors_seen"]) for s in self.streams.values())

    @property
    def error_shards(self) -> list[str]:
        return sorted({e.split("|", 1)[0] for s in self.streams.values() for e in s["errors_seen"]})

    def state_dict(self) -> dict:
        carried = {seg[0] for s in self.streams.values() for seg in s.get("segments", [])}
        state = {"version": 1, "rank": self.spec.rank, "world_size": self.spec.world,
                 "workers": self.spec.workers, "units": self.units_fp, "seed": self.spec.seed,
                 "next_worker": self.next_worker,
                 "streams": {str(k): v for k, v in sorted(self.streams.items())}}
        if carried:  # the deals that carried segments are replayed under (checked at resume)
            state["other_units"] = {str(n): fingerprint(self.spec.other_units[n]) for n in sorted(carried)}
        if self.inherited:
            state["errors_inherited"] = self.inherited
        return state


def check_resumable(saved: dict, spec: StreamSpec, units_fp: str) -> None:
    """Refuse (clearly) to resume a data stream onto a different topology or shard set."""
    if saved.get("version") != 1:
        raise DataError(f"checkpoint data_state version {saved.get('version')!r} is not 1")
    if (saved["world_size"], saved["workers"]) != (spec.world, spec.workers):
        raise DataError(
            f"the checkpoint's data stream was written by {saved['world_size']} ranks x "
            f"{saved['workers']} workers; this run has {spec.world} x {spec.workers}. Exact resume "
            f"needs the same topology: relaunch with {saved['world_size']} ranks and "
            f"data.num_workers={saved['workers']}, or set run.elastic_resume=true to re-deal it")
    other = {int(n): fp for n, fp in saved.get("other_units", {}).items()}
    # A rebalanced state (elastic resume) has no fingerprint of the new deal yet ("units": None);
    # its carried segments' deals are fingerprinted, and they come from the same shard set.
    if (saved["units"] is not None and saved["units"] != units_fp) or \
            any(fingerprint(spec.other_units[n]) != fp for n, fp in other.items()):
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
    state = DataState(spec, fp)
    state.inherited = int((saved or {}).get("errors_inherited", 0))
    return DataLoader(TrainStream(spec), **kwargs), state
