"""Command line of ``python -m lapvqa.shard`` (see docs/sharding.md)."""

from __future__ import annotations

import argparse
import os
import sys

from ..reports import SECTION_MODES
from ..storage import StorageError
from .config import RunOptions, ShardConfig
from .inputs import InputError
from .manifest import PlanMismatch

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_INCOMPLETE", "EXIT_USAGE", "EXIT_IO"]

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_IO = 0, 1, 2, 3
_D = ShardConfig()


def _slurm_default(var: str, fallback: int) -> int:
    try:
        return int(os.environ[var])
    except (KeyError, ValueError):
        return fallback


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only (not None/False, not twice)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lapvqa.shard",
        description="MIMIC-CXR(-JPG) + reports -> verified WebDataset shards (local or s3://).",
        formatter_class=_Formatter)
    io_ = p.add_argument_group("inputs and output")
    io_.add_argument("--images", help="MIMIC-CXR-JPG root (files/ + mimic-cxr-2.0.0-*.csv[.gz]) "
                     "or MIMIC-CXR DICOM root (files/ + cxr-record-list.csv[.gz]); local or s3://")
    io_.add_argument("--reports", help="mimic-cxr-reports folder (files/p1X/.../sNNN.txt) or "
                     "mimic-cxr-reports.zip")
    io_.add_argument("--out", help="output folder or s3://bucket/prefix")
    io_.add_argument("--metadata", default=None, help="folder with MIMIC-CXR-JPG's split/chexpert/"
                     "metadata CSVs, for a DICOM root (default: the images root; without a split "
                     "CSV a patient-level hash split is used)")
    data = p.add_argument_group("what goes into the shards (recorded in the manifest)")
    data.add_argument("--size", type=int, default=_D.size, help="output side in px (longer side "
                      "scaled to it, padded square)")
    data.add_argument("--sections", choices=SECTION_MODES, default=_D.sections,
                      help="report text: everything but the banner, or FINDINGS+IMPRESSION only")
    data.add_argument("--max-tokens", type=int, default=_D.max_tokens,
                      help="GPT-2 tokens kept per report (longer ones are truncated and flagged)")
    data.add_argument("--views", choices=("all", "frontal"), default=_D.views,
                      help="'frontal' keeps ViewPosition PA/AP only")
    data.add_argument("--samples-per-shard", type=int, default=_D.samples_per_shard,
                      help="images per shard (~30-50 MB at 384 px; ~370 train shards for MIMIC)")
    data.add_argument("--seed", type=int, default=_D.seed, help="seed of the global sample order")
    data.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    data.add_argument("--jpeg-quality", type=int, default=_D.jpeg_quality,
                      help="quality of the output JPEGs (95: ~30-50 kB per 384 px image)")
    data.add_argument("--min-side", type=int, default=_D.min_side,
                      help="reject images whose shorter side is smaller (px)")
    data.add_argument("--labels", choices=("chexpert", "negbio"), default=_D.labels,
                      help="which MIMIC-CXR-JPG label file fills json['labels']")
    run = p.add_argument_group("execution (never changes the output bytes)")
    run.add_argument("--workers", type=int, default=0, help="worker processes (0 = all CPUs)")
    run.add_argument("--io-threads", type=int, default=4, help="read-ahead threads per worker")
    run.add_argument("--task-index", type=int, default=None,
                     help="this task of --num-tasks (default: $SLURM_ARRAY_TASK_ID - "
                     "$SLURM_ARRAY_TASK_MIN, else 0)")
    run.add_argument("--num-tasks", type=int, default=None,
                     help="tasks sharing the work (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    run.add_argument("--resume-check", choices=("sha256", "size"), default="sha256",
                     help="how existing shards are verified before being kept")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an output made with other inputs/settings")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--finalize", action="store_true",
                      help="only write manifest.json once all shards are done (after an array)")
    mode.add_argument("--verify", metavar="OUT", default=None,
                      help="re-read the shards in OUT against its manifest and print stats")
    return p


def _options(a: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[RunOptions, ShardConfig]:
    for flag in ("images", "reports", "out"):
        if not getattr(a, flag):
            p.error(f"--{flag} is required")
    num = a.num_tasks if a.num_tasks is not None else _slurm_default("SLURM_ARRAY_TASK_COUNT", 1)
    idx = a.task_index
    if idx is None:
        idx = _slurm_default("SLURM_ARRAY_TASK_ID", 0) - _slurm_default("SLURM_ARRAY_TASK_MIN", 0)
    checks = [(a.size >= 16, "--size must be >= 16"), (a.max_tokens >= 1, "--max-tokens must be >= 1"),
              (a.max_tokens < 65536, "--max-tokens must be < 65536"),
              (a.samples_per_shard >= 1, "--samples-per-shard must be >= 1"),
              (1 <= a.jpeg_quality <= 100, "--jpeg-quality must be 1..100"),
              (a.limit >= 0, "--limit must be >= 0"), (a.workers >= 0, "--workers must be >= 0"),
              (num >= 1 and 0 <= idx < num, f"--task-index {idx} not in 0..{num - 1}")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    from ..storage import open_store

    for flag in ("images", "out", "metadata"):
        try:
            if getattr(a, flag):
                open_store(getattr(a, flag))
        except ValueError as e:
            p.error(f"--{flag}: {e}")
    cfg = ShardConfig(size=a.size, sections=a.sections, max_tokens=a.max_tokens, views=a.views,
                      samples_per_shard=a.samples_per_shard, seed=a.seed,
                      jpeg_quality=a.jpeg_quality, min_side=a.min_side, labels=a.labels,
                      limit=a.limit)
    opts = RunOptions(images=a.images, reports=a.reports, out=a.out, metadata=a.metadata,
                      workers=a.workers, io_threads=a.io_threads, task_index=idx, num_tasks=num,
                      overwrite=a.overwrite, resume_check=a.resume_check,
                      progress=not a.no_progress)
    return opts, cfg


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        if a.verify:
            from .verify import verify

            return verify(a.verify, workers=a.workers or RunOptions("", "", "").resolved_workers())
        opts, cfg = _options(a, p)
        from .runner import run_finalize, run_shard

        return run_finalize(opts, cfg) if a.finalize else run_shard(opts, cfg)
    except (InputError, PlanMismatch) as e:
        print(f"lapvqa.shard: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, OSError) as e:
        print(f"lapvqa.shard: I/O error: {e}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print("lapvqa.shard: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
