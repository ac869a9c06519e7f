"""WebDataset pipeline: manifest -> per-stream shard plan -> tar read -> shuffle -> decode -> batch.

Entry points used by the trainer and the benchmark::

    loader, state = build_train_loader(cfg, image_size, rank, world, saved=None)
    val_loader = build_val_loader(cfg, image_size, rank, world)
"""

from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader

from lapvqa.config import Config
from lapvqa.data.batch import Batch, collate
from lapvqa.data.manifest import DataError, Manifest, ShardInfo, load_manifest
from lapvqa.data.plan import Unit, make_units, split_units, stream_units
from lapvqa.data.stream import DataState, StreamSpec, make_train_loader
from lapvqa.data.validation import ValSpec, make_val_loader, sample_limits

__all__ = ["Batch", "DataError", "DataState", "Manifest", "ShardInfo", "StreamSpec", "Unit",
           "build_train_loader", "build_val_loader", "collate", "load_manifest", "make_units",
           "split_units", "stream_units"]


def train_spec(cfg: Config, image_size: int, rank: int, world: int,
               manifest: Optional[Manifest] = None) -> StreamSpec:
    if manifest is None:
        _, manifest = load_manifest(cfg.data.shards)
    workers = max(1, cfg.data.num_workers)
    units = make_units(manifest.shards(cfg.data.train_split), world * workers)
    return StreamSpec(url=cfg.data.shards, units=units, seed=cfg.seed, rank=rank, world=world,
                      workers=workers, batch_size=cfg.train.micro_batch_size, image_size=image_size,
                      max_tokens=cfg.data.max_tokens, shuffle_buffer=cfg.data.shuffle_buffer,
                      augment=cfg.augment if cfg.augment.enabled else None,
                      max_empty_epochs=cfg.data.max_empty_epochs)


def build_train_loader(cfg: Config, image_size: int, rank: int, world: int,
                       saved: Optional[dict] = None, pin_memory: bool = False):
    """(infinite DataLoader of Batch, DataState) for this rank; ``saved`` = this rank's state
    (from a checkpoint of the same topology, or lapvqa.data.elastic.rebalance'd from another).
    ``state.manifest_sha256`` is the hash of the manifest.json these shards were planned from."""
    _, manifest = load_manifest(cfg.data.shards)
    spec = train_spec(cfg, image_size, rank, world, manifest)
    shards = manifest.shards(cfg.data.train_split)
    # deals of an earlier topology whose streams' segments this rank still carries (elastic resume)
    spec.other_units = {int(n): make_units(shards, int(n)) for n in (saved or {}).get("other_units", {})}
    loader, state = make_train_loader(spec, cfg.data.num_workers, cfg.data.prefetch_factor,
                                      pin_memory and cfg.data.pin_memory, saved)
    state.manifest_sha256 = manifest.sha256
    return loader, state


def build_val_loader(cfg: Config, image_size: int, rank: int, world: int,
                     pin_memory: bool = False) -> DataLoader:
    _, manifest = load_manifest(cfg.data.shards)
    shards = manifest.shards(cfg.data.val_split)
    units = split_units(make_units(shards, world), rank, world)
    spec = ValSpec(url=cfg.data.shards, units=units,
                   limits=sample_limits(shards, cfg.validate.max_samples),
                   batch_size=cfg.validate.micro_batch_size or cfg.train.micro_batch_size,
                   image_size=image_size, max_tokens=cfg.data.max_tokens, rank=rank)
    return make_val_loader(spec, cfg.validate.num_workers, pin_memory and cfg.data.pin_memory)
