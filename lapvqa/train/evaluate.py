"""Validation: token-weighted loss over the whole validate split, each sample counted once.

Every rank sums loss and target tokens over its own validate units (lapvqa.data.validation deals
them without overlap), then one all_reduce adds the sums, so the result does not depend on how
samples fell on ranks or batches.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from lapvqa.config import Config
from lapvqa.data import build_val_loader


@torch.no_grad()
def validate(engine, cfg: Config, image_size: int, rank: int, world: int, device) -> dict:
    t0 = time.perf_counter()
    model = engine.module
    was_training = model.training
    model.eval()
    loss_sum, tokens, samples, errors = 0.0, 0, 0, {}
    try:
        for i, batch in enumerate(build_val_loader(cfg, image_size, rank, world, device.type == "cuda")):
            errors[i % max(1, cfg.validate.num_workers)] = batch.meta.get("errors", 0)
            if len(batch) == 0:
                continue
            b = batch.to(device)
            loss = model(b.images, b.tokens, b.mask, reduction="sum")
            loss_sum += float(loss)
            tokens += batch.n_target_tokens
            samples += len(batch)
    finally:
        model.train(was_training)
    sums = torch.tensor([loss_sum, tokens, samples, sum(errors.values())], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    loss_sum, tokens, samples, n_err = sums.tolist()
    return {"val_loss": loss_sum / max(tokens, 1.0), "val_tokens": int(tokens),
            "val_samples": int(samples), "val_data_errors": int(n_err),
            "val_time_s": time.perf_counter() - t0}
