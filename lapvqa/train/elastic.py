"""Elastic resume: continue a run on another number of ranks (``run.elastic_resume=true``).

A SLURM job that comes back on fewer (or more) nodes than it was preempted on cannot load its
ZeRO-2 checkpoint as is: the fp32 master weights and AdamW moments are partitioned by rank.
DeepSpeed's universal checkpoint format stores them per parameter instead, so:

1. rank 0 converts the checkpoint with ``deepspeed.checkpoint.ds_to_universal`` into
   ``checkpoints/universal/<tag>`` (the original stays untouched; the copy is deleted once every
   rank has loaded it);
2. the engine is built with ``checkpoint.load_universal`` and loads it, re-partitioned;
3. the data stream is re-dealt (lapvqa/data/elastic.py): no sample of a begun epoch is lost or
   repeated, though the order is not the one the old topology would have read;
4. the global batch -- and with it what a step means to the LR schedule -- is kept by setting
   ``train.grad_accum_steps`` (the run's config.yaml records the value used); every later resume
   keeps it too.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from lapvqa.config import Config
from lapvqa.train.checkpoint import UNIVERSAL_DIR, ResumeError
from lapvqa.train.dist import all_gather_object

log = logging.getLogger("lapvqa.train")


def saved_global_batch(marker: dict, run_dir: Path, elastic: bool) -> Optional[int]:
    """The global batch the checkpoint was trained with: its COMPLETE marker says so; markers of
    older versions do not, and then (for an elastic resume) the run's config.yaml does."""
    if marker.get("global_batch"):
        return int(marker["global_batch"])
    if not elastic:
        return None
    try:
        train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
        return int(train["micro_batch_size"]) * int(train["grad_accum_steps"]) * int(marker["world_size"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def keep_global_batch(cfg: Config, marker: dict, world: int, run_dir: Path, elastic: bool = True) -> None:
    """Set train.grad_accum_steps so that ``world`` ranks train with the checkpoint's global batch.
    Every resume does this, not only the elastic one: after 8 -> 4 ranks (accumulation doubled),
    the next requeue on 4 ranks reads the unchanged YAML again."""
    saved = saved_global_batch(marker, run_dir, elastic)
    micro = cfg.train.micro_batch_size
    if saved is None and not elastic:
        return  # a checkpoint of an older version on the same topology: nothing to compare
    if saved is None:
        raise ResumeError(f"checkpoint {marker['tag']} does not record its global batch and "
                          f"{run_dir / 'config.yaml'} is unreadable: cannot resume elastically")
    if saved % (world * micro):
        raise ResumeError(
            f"checkpoint {marker['tag']} trained with a global batch of {saved} on "
            f"{marker['world_size']} ranks; {world} ranks x train.micro_batch_size={micro} x "
            f"grad_accum_steps cannot make {saved}: choose train.micro_batch_size so that "
            f"{world} x micro_batch_size divides {saved}")
    accum = saved // (world * micro)
    if accum != cfg.train.grad_accum_steps:
        log.warning("resume: train.grad_accum_steps %d -> %d keeps the checkpoint's global batch of %d "
                    "(%d ranks x %d micro-batch)", cfg.train.grad_accum_steps, accum, saved, world, micro)
        cfg.train.grad_accum_steps = accum


def _convert(src: Path, dst: Path) -> Optional[str]:
    """ds_to_universal in a subprocess (it runs its own worker pools); an error message or None."""
    shutil.rmtree(dst.parent, ignore_errors=True)  # a copy left by a killed start
    dst.parent.mkdir(parents=True)
    workers = str(max(1, min(4, (os.cpu_count() or 1) // 2)))
    # --inject_missing_state: the version marker Megatron-style clients add; our checkpoints
    # hold plain nn.Module parameters, which the converter handles without further metadata.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(dst), "--inject_missing_state",
           "--num_extract_workers", workers, "--num_merge_workers", workers]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    shutil.rmtree(dst.parent, ignore_errors=True)
    tail = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:]
    return f"DeepSpeed could not convert {src} for an elastic resume (exit {proc.returncode}): " + \
        (tail[0] if tail else "no output")


def to_universal(ckpt_dir: Path, tag: str, is_main: bool) -> Path:
    """Rank 0 writes the universal copy of ``tag``; every rank gets the folder to load it from."""
    out = ckpt_dir / UNIVERSAL_DIR
    error = None
    if is_main:
        log.info("elastic resume: converting %s to DeepSpeed's universal format", tag)
        error = _convert(ckpt_dir / tag, out / tag)
    error = all_gather_object(error)[0]  # also the barrier: no rank loads a half-written copy
    if error:
        raise ResumeError(error)
    return out


def remove_universal(ckpt_dir: Path, is_main: bool) -> None:
    all_gather_object(None)  # every rank has loaded it
    if is_main:
        shutil.rmtree(ckpt_dir / UNIVERSAL_DIR, ignore_errors=True)
