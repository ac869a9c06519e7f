"""Streaming DeepSpeed ZeRO-2 training: ``deepspeed launch/train.py --config configs/X.yaml [--a.b=v ...]``.

``main(argv)`` is the whole command (launch/train.py only calls it). Exit codes: 0 done,
2 bad config / cannot resume as asked, 3 too many non-finite steps, 4 too many corrupt samples,
75 stopped by SIGTERM/SIGUSR1 after checkpointing (re-run the same command to continue).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from lapvqa.config import Config, ConfigError, load_config

log = logging.getLogger("lapvqa.train")
EXIT_CONFIG = 2


def _parse(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.splitlines()[0],
                                epilog="Any config key can be overridden: --train.max_steps=100 --run.dir=runs/x")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    # deepspeed's launcher passes --local_rank; we read LOCAL_RANK from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("lapvqa").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("lapvqa.data").setLevel(logging.WARNING)  # corrupt data: every rank reports
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _one_line(e: BaseException) -> str:
    # Errors re-raised from DataLoader workers carry the worker's traceback; keep the message.
    lines = [l for l in str(e).splitlines() if l.strip()]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


def train(cfg: Config) -> int:
    """Run (or resume) the training described by ``cfg``; returns the process exit code."""
    import torch.distributed as dist

    from lapvqa.data import DataError
    from lapvqa.train.checkpoint import ResumeError
    from lapvqa.train.dist import init_distributed
    from lapvqa.train.loop import Trainer
    from lapvqa.train.signals import EXIT_DATA

    info = init_distributed()
    setup_logging(info.rank)
    if info.is_main:
        log.info("%d rank(s) via %s on %s; run dir %s", info.world_size, info.launcher, info.device, cfg.run.dir)
    try:
        trainer = Trainer(cfg, info)
        trainer.setup()
        code = trainer.run()
    except (ConfigError, ResumeError) as e:
        log.error("%s", _one_line(e))
        code = EXIT_CONFIG
    except DataError as e:
        log.error("data: %s", _one_line(e))
        code = EXIT_DATA
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    return code


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = _parse(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"launch/train.py: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    code = train(cfg)
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        # Skip interpreter teardown (DataLoader workers, gloo threads) that can hang after errors.
        os._exit(code)
    return code
