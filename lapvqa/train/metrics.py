"""Rank 0's record of the run: metrics.jsonl (+ TensorBoard event files, + tqdm), events.jsonl.

On resume from step N, rows after N (written by the killed run after its last checkpoint) are
dropped, so metrics.jsonl always reads as one uninterrupted run; the resumed run re-creates them
identically (that is what exact resume means). TensorBoard gets ``purge_step`` for the same reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("lapvqa.train")


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def truncate_rows(path: Path, last_step: int) -> int:
    """Keep rows with step <= last_step (atomic rewrite); returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1  # a torn last line from a kill mid-write
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


class RunLog:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool, start_step: int,
                 max_steps: int, tensorboard: bool, progress: bool):
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.tb = self.bar = None
        if not enabled:
            return
        dropped = truncate_rows(self.dir / "metrics.jsonl", start_step)
        if dropped:
            log.info("metrics.jsonl: dropped %d rows after step %d (re-created by this run)", dropped, start_step)
        self.metrics = open(self.dir / "metrics.jsonl", "a")
        self.events = open(self.dir / "events.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def row(self, row: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            prefix = "val" if "val_loss" in row else "train"
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])
        if self.bar is not None and "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def event(self, kind: str, **fields) -> None:
        if self.enabled:
            self.events.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
            self.events.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        for f in (self.metrics, self.events):
            f.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Global images/s, tokens/s, MFU and mean data-wait fraction since the last log row."""

    def __init__(self, flops_fn, peak_flops: Optional[float], world_size: int):
        self.peak, self.world = peak_flops, world_size
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.images, self.tokens, self.flops = time.perf_counter(), 0.0, 0, 0, 0.0

    def add(self, images: int, tokens: int, flops: float, mean_wait_s: float) -> None:
        self.images += images
        self.tokens += tokens
        self.flops += flops
        self.wait += mean_wait_s

    def summary(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        mfu = self.flops / dt / (self.peak * self.world) if self.peak else None
        return {"images_per_s": self.images / dt, "tokens_per_s": self.tokens / dt,
                "mfu": mfu, "data_wait": min(1.0, self.wait / dt)}


_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                     "L4": 121.0, "V100": 125.0, "A6000": 155.0}


def peak_flops(configured_tflops: Optional[float], device) -> Optional[float]:
    """Per-device dense bf16 peak: configured, else looked up from the GPU name; CPU: unknown."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        import torch
        name = torch.cuda.get_device_name(device)
        for key, tflops in _PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None
