"""Which samples each data stream reads: shards (or slices of them) assigned without overlap.

A *stream* is one DataLoader worker of one rank: ``stream = rank * workers + worker``. Streams are
infinite: each goes through its share of an epoch, then its share of the next epoch. Every rank
therefore yields the same number of steps (no epoch-end hang with uneven shards) and, within an
epoch, every sample belongs to exactly one stream.

When there are fewer shards than streams, shards are cut into slices (sample i of a shard goes to
slice i % n_slices) so that every stream still gets work; each slice re-reads its shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lapvqa.data.manifest import ShardInfo


@dataclass(frozen=True)
class Unit:
    shard: str
    slice: int = 0
    n_slices: int = 1

    def takes(self, index: int) -> bool:
        return index % self.n_slices == self.slice


def make_units(shards: list[ShardInfo], n_parts: int) -> list[Unit]:
    """Shards, sliced so that there are at least ``n_parts`` units."""
    n_slices = max(1, math.ceil(n_parts / max(1, len(shards))))
    return [Unit(s.name, j, n_slices) for s in shards for j in range(n_slices)]


def epoch_rng(seed: int, *words: int) -> np.random.Generator:
    """Independent, reproducible random streams keyed by (seed, epoch, stream, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, *words])))


def stream_units(units: list[Unit], seed: int, epoch: int, stream: int, n_streams: int) -> list[Unit]:
    """This stream's units in ``epoch``: a seeded permutation of all units, dealt round-robin."""
    order = epoch_rng(seed, 0xE90C, epoch).permutation(len(units))
    return [units[i] for i in order[stream::n_streams]]


def split_units(units: list[Unit], part: int, n_parts: int) -> list[Unit]:
    """Fixed (unshuffled) deal: used for validation, where order does not matter."""
    return units[part::n_parts]
