"""Per-pixel mean and std of the training images, for ``ModelConfig.pixel_norm = "pixel"``.

Measured once, before step 0 of a fresh run, on the first ``model.pixel_stats_samples`` training
samples in manifest order (no shuffling, no augmentation), each read by exactly one rank as
validation reads its split; the sums are all-reduced, so every rank sets identical maps. A resumed
run takes the maps from its checkpoint (they are persistent buffers), so they never change
mid-run, and consolidate carries them into the released files.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

from lapvqa.config import Config, ConfigError
from lapvqa.data import build_val_loader

log = logging.getLogger("lapvqa.train")
# Added to every pixel's variance: a pixel that hardly varies (the padding corners) must not turn
# a few grey levels of noise or augmentation into huge inputs. 0.03 = 8 grey levels.
STD_EPS = 0.03


def measure(cfg: Config, image_size: int, rank: int, world: int,
            device=torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean [S, S], std [S, S], images) over the first samples of the training split."""
    limit = cfg.model.pixel_stats_samples
    if limit < 1:
        raise ConfigError("model.pixel_stats_samples must be >= 1 with model pixel_norm: pixel")
    train_as_val = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, val_split=cfg.data.train_split),
        validate=dataclasses.replace(cfg.validate, max_samples=limit))
    sums = torch.zeros(2, image_size, image_size, dtype=torch.float64)
    count = 0
    for batch in build_val_loader(train_as_val, image_size, rank, world):
        if len(batch) == 0:
            continue
        x = batch.images[:, 0].to(torch.float64) / 255.0  # [B, S, S]
        sums[0] += x.sum(0)
        sums[1] += (x * x).sum(0)
        count += len(batch)
    total = torch.cat([sums.flatten(), torch.tensor([float(count)], dtype=torch.float64)])
    if dist.is_initialized():
        total = total.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(total)
        total = total.cpu()
    n = int(total[-1])
    if n == 0:
        raise ConfigError(f"pixel_norm: pixel, but the {cfg.data.train_split!r} split yielded no images")
    mean, sq = (total[:-1] / n).view(2, image_size, image_size)
    std = ((sq - mean * mean).clamp(min=0) + STD_EPS ** 2).sqrt()
    return mean.float(), std.float(), n


def apply(model, cfg: Config, image_size: int, rank: int, world: int, device) -> None:
    """Measure on this run's training shards and set the encoder's maps (fresh runs only)."""
    mean, std, n = measure(cfg, image_size, rank, world, device)
    model.vision_encoder.set_pixel_stats(mean, std)
    if rank == 0:
        log.info("pixel_norm=pixel: mean/std maps from %d training images (mean %.3f, std %.3f)",
                 n, float(mean.mean()), float(std.mean()))
