"""Settings of a sharding run. Only ``ShardConfig`` fields change the output bytes."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

__all__ = ["ShardConfig", "RunOptions", "FRONTAL_VIEWS"]

FRONTAL_VIEWS = ("PA", "AP")


@dataclass(frozen=True)
class ShardConfig:
    """What goes into the shards; recorded in manifest.json["settings"]."""

    size: int = 384  # model card input size: longer side -> size, padded square
    sections: str = "full"  # full | findings-impression
    max_tokens: int = 510  # report tokens; the trainer adds EOT before and after -> 512
    views: str = "all"  # all | frontal (ViewPosition PA or AP)
    # 1000 x 30-50 kB = 30-50 MB per shard -> ~370 train shards for full MIMIC-CXR: every
    # reader of 8 nodes x 8 GPUs x 4 loader workers (256) gets its own shards, and each shard
    # streams in well under a second while being big enough for efficient sequential reads.
    samples_per_shard: int = 1000
    seed: int = 0  # global order: seeded shuffle per split, so each shard mixes patients
    jpeg_quality: int = 95
    min_side: int = 128  # images whose shorter side is below this are rejected
    labels: str = "chexpert"  # chexpert | negbio
    limit: int = 0  # 0 = all; else the first N images in (subject, study, dicom) order

    def settings(self) -> dict:
        return asdict(self)


@dataclass
class RunOptions:
    """How a run executes; never changes the output bytes."""

    images: str
    reports: str
    out: str
    metadata: str | None = None
    workers: int = 0  # 0 = all CPUs of this task
    io_threads: int = 4
    task_index: int = 0
    num_tasks: int = 1
    overwrite: bool = False
    resume_check: str = "sha256"  # sha256 | size
    progress: bool = True

    def resolved_workers(self) -> int:
        if self.workers > 0:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return max(1, os.cpu_count() or 1)
