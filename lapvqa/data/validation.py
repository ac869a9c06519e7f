"""The validation stream: each validate sample read by exactly one rank, once, in a fixed order.

Units are dealt to ranks (then to that rank's workers) without shuffling; ranks may get unequal
numbers of batches, which is fine because validation only all-reduces the sums at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lapvqa.data.batch import Batch, collate
from lapvqa.data.manifest import ShardInfo
from lapvqa.data.plan import Unit, split_units
from lapvqa.data.reader import ErrorLog, iter_tar_samples
from lapvqa.data.stream import ignore_stop_signals
from lapvqa.data.transform import SampleError, decode_sample
from lapvqa.storage import open_store


@dataclass
class ValSpec:
    url: str
    units: list[Unit]  # this rank's units
    limits: dict  # shard -> how many of its first samples count (validate.max_samples)
    batch_size: int
    image_size: int
    max_tokens: int
    rank: int


def sample_limits(shards: list[ShardInfo], max_samples: int) -> dict:
    """validate.max_samples: keep the first N samples in manifest order (0 = all)."""
    limits, left = {}, max_samples
    for s in shards:
        limits[s.name] = s.samples if max_samples == 0 else max(0, min(s.samples, left))
        left -= limits[s.name]
    return limits


class ValStream(IterableDataset):
    def __init__(self, spec: ValSpec):
        self.spec = spec

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec, pending = self.spec, []
        errors = ErrorLog(where=f" (validation, rank {spec.rank})")
        store = open_store(spec.url)
        for unit in split_units(spec.units, worker, workers):
            limit = spec.limits.get(unit.shard, 0)
            for i, raw in enumerate(iter_tar_samples(store, unit.shard, errors)):
                if i >= limit:
                    break
                if not unit.takes(i):
                    continue
                try:
                    pending.append(decode_sample(raw, spec.image_size, spec.max_tokens, None, None))
                except SampleError as e:
                    errors.add(unit.shard, raw["__key__"], f"sample {raw['__key__']!r}: {e}")
                if len(pending) == spec.batch_size:
                    yield collate(pending, {"errors": errors.count})
                    pending = []
        if pending:
            yield collate(pending, {"errors": errors.count})
        elif errors.count:  # an empty batch still reports this worker's error count
            yield collate([], {"errors": errors.count}, image_size=spec.image_size)


def make_val_loader(spec: ValSpec, num_workers: int, pin_memory: bool) -> DataLoader:
    workers = min(num_workers, len(spec.units))
    return DataLoader(ValStream(spec), batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None)
