"""Rank discovery and process-group set-up for every launcher.

deepspeed / torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Under ``srun``
those come from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of SLURM_NODELIST).
A plain ``python launch/train.py`` is a world of one on a free loopback port.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lapvqa.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # "env" (deepspeed/torchrun), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list: 'gpu[01-03,07],login1' -> [gpu01, gpu02, gpu03, gpu07, login1]."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def first_host(nodelist: str) -> str:
    """``scontrol show hostnames`` when available (exact), else our parser."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=20, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_env(env=os.environ) -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in ``env``; returns which launcher provided them."""
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return "env"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        env.setdefault("MASTER_ADDR", first_host(nodelist) if nodelist else "127.0.0.1")
        # Same port on every task without talking: derived from the job id (override: MASTER_PORT).
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def init_distributed(timeout_min: float = 30.0) -> DistInfo:
    """Resolve the ranks, pick the device, start NCCL (GPUs) or gloo (CPU) through DeepSpeed."""
    import deepspeed

    launcher = resolve_env()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_min))
        if device.type == "cpu":
            release_shm_names(rank)
    return DistInfo(rank, world, local, device, launcher)


SHM_DIR = "/dev/shm"


def shm_buffer_path(rank: int, env=os.environ) -> str:
    """Where DeepSpeed's CPU shared-memory allreduce (ops/csrc/cpu/comm/shm.cpp) keeps ``rank``'s
    workspace: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_" \
           f"{env.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(SHM_DIR, name)


def release_shm_names(rank: int) -> None:
    """Unlink this rank's shared-memory name once every rank has mapped every workspace.

    DeepSpeed never unlinks them, so each CPU run left ~69 MB per rank in /dev/shm for good (7 GB
    had piled up on a test box). Every rank's shm_initialize waits until it has opened all the
    others' buffers, so after this barrier the names are no longer needed: the mappings stay
    valid and the kernel frees the memory when the last rank exits, even after a SIGKILL."""
    dist.barrier()
    try:
        os.unlink(shm_buffer_path(rank))
    except FileNotFoundError:  # not all ranks on one host (no shm op), or another DeepSpeed
        pass


def all_gather_object(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_shared_dir(path: Path, rank: int) -> None:
    """Every rank must see the same run.dir: checkpoints are written by all ranks and read back by
    all ranks, so a node-local or relative path that differs per node breaks the first resume,
    hours later. Rank 0 writes a nonce there; a rank that cannot read it back fails the start."""
    token = path / ".lapvqa-shared-check"
    nonce = os.urandom(8).hex() if rank == 0 else None
    if rank == 0:
        token.write_text(nonce)
    nonce = all_gather_object(nonce)[0]  # also the barrier: the file exists before anyone looks
    try:
        sees = token.read_text() == nonce
    except OSError:
        sees = False
    seen = all_gather_object((sees, socket.gethostname(), str(path.resolve())))
    if rank == 0:
        token.unlink(missing_ok=True)
    blind = [f"rank {r} on {host} ({where})" for r, (ok, host, where) in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(
            f"run.dir is not one folder for all ranks: rank 0 on {seen[0][1]} wrote to {seen[0][2]}, "
            f"which {', '.join(blind[:4])}{' ...' if len(blind) > 4 else ''} cannot see. Put run.dir on a "
            "filesystem every node mounts (Lustre, GPFS, NFS) and give it as an absolute path")
