"""Checkpoints under run_dir/checkpoints/: only COMPLETE ones are ever loaded.

Layout (lapvqa.consolidate depends on it)::

    checkpoints/global_step{N}/            DeepSpeed save_checkpoint(tag="global_step{N}")
    checkpoints/global_step{N}/COMPLETE    JSON {step, tag, world_size, val_loss, model_config, ...},
                                           written (atomically) after every rank finished saving
    checkpoints/latest                     text: the newest complete tag
    checkpoints/best.json                  {"tag", "step", "val_loss"}: lowest validation loss

A tag directory without COMPLETE (a save that was killed) is never loaded and is removed at the
next start. Rotation keeps the newest ``keep_last`` complete tags plus the best one.

COMPLETE also lists every file of the checkpoint with its size. A checkpoint damaged after it
was written (a scratch purge that deleted files, an interrupted copy of the run dir, a full
disk during an rsync) is found at start-up before DeepSpeed reads it: it is moved aside to
``damaged-<tag>`` with an error naming the file, and the run resumes from the newest intact one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

log = logging.getLogger("lapvqa.train")
TAG_RE = re.compile(r"^global_step(\d+)$")
UNIVERSAL_DIR = "universal"  # checkpoints/universal/<tag>: a converted copy, only during an elastic resume
FAULT_ENV = "LAPVQA_FAULT_KILL_IN_SAVE"  # "RANK:STEP": that rank SIGKILLs itself inside that save,
# after DeepSpeed wrote its files and before COMPLETE: a checkpoint that looks whole but is not.


class ResumeError(RuntimeError):
    """A run dir that cannot be resumed as asked; the message says what to do."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Make the files DeepSpeed wrote durable before COMPLETE claims they are there."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """Every file of a checkpoint (COMPLETE aside) -> its size in bytes."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != "COMPLETE"}


def damage(tag_dir: Path, marker: dict) -> Optional[str]:
    """What is wrong with a complete checkpoint's files (None: all there, sizes as written).
    Markers of versions that did not list the files cannot be checked and pass."""
    for name, size in (marker.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def _maybe_die(rank: int, step: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault and fault == f"{rank}:{step}":
        log.error("fault injection (%s=%s): rank %d dies inside the save of step %d", FAULT_ENV, fault, rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


class Checkpoints:
    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.rank, self.world_size = rank, world_size

    # -- reading ---------------------------------------------------------------------------
    def tags(self) -> list[tuple[int, str]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.dir.iterdir()
                 if p.is_dir() and (m := TAG_RE.match(p.name))]
        return sorted(found)

    def marker(self, tag: str) -> Optional[dict]:
        path = self.dir / tag / "COMPLETE"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # missing or torn: not a usable checkpoint

    def complete(self) -> list[dict]:
        return [m for _, tag in self.tags() if (m := self.marker(tag)) is not None]

    def best(self) -> Optional[dict]:
        try:
            return json.loads((self.dir / "best.json").read_text())
        except (OSError, ValueError):
            return None

    # -- start-up (rank 0) -------------------------------------------------------------------
    def remove_partial(self) -> list[str]:
        removed = []
        for _, tag in self.tags():
            if self.marker(tag) is None:
                log.warning("removing partial checkpoint %s (no COMPLETE marker: its save was "
                            "interrupted; it is never loaded)", self.dir / tag)
                shutil.rmtree(self.dir / tag, ignore_errors=True)
                removed.append(tag)
        # a universal copy made for an elastic resume that was killed before it was removed
        shutil.rmtree(self.dir / UNIVERSAL_DIR, ignore_errors=True)
        return removed

    def set_aside_damaged(self) -> list[str]:
        """Move complete checkpoints whose files are missing or resized to damaged-<tag>."""
        moved = []
        for _, tag in self.tags():
            marker = self.marker(tag)
            problem = damage(self.dir / tag, marker) if marker else None
            if problem:
                # COMPLETE goes first: a kill before the move leaves a partial tag (removed at the
                # next start), never a damaged folder that still claims to be whole
                os.replace(self.dir / tag / "COMPLETE", self.dir / tag / "COMPLETE.damaged")
                aside = self.dir / f"damaged-{tag}"
                shutil.rmtree(aside, ignore_errors=True)  # an older copy of the same tag
                os.replace(self.dir / tag, aside)
                log.error("checkpoint %s is damaged (%s): moved to %s and never loaded; resuming "
                          "from the newest intact checkpoint instead", tag, problem, aside)
                moved.append(tag)
        self.reconcile_latest()
        return moved

    def damaged(self) -> list[str]:
        return sorted(p.name for p in self.dir.glob("damaged-global_step*")) if self.dir.is_dir() else []

    def reconcile_latest(self) -> None:
        """``latest`` names the newest complete tag (DeepSpeed's own tools read it)."""
        intact = self.complete()
        if not intact:
            (self.dir / "latest").unlink(missing_ok=True)
            return
        path = self.dir / "latest"
        if not path.exists() or path.read_text().strip() != intact[-1]["tag"]:
            (self.dir / ".latest.tmp").write_text(intact[-1]["tag"] + "\n")
            os.replace(self.dir / ".latest.tmp", path)

    def reconcile_best(self) -> Optional[dict]:
        """best.json = lowest val_loss among complete checkpoints (fixes a kill before best.json)."""
        candidates = [m for m in self.complete() if m.get("val_loss") is not None]
        if not candidates:
            if self.best() and self.marker(self.best()["tag"]) is None:  # its checkpoint set aside
                (self.dir / "best.json").unlink()
            return None
        m = min(candidates, key=lambda m: (m["val_loss"], m["step"]))
        best = {"tag": m["tag"], "step": m["step"], "val_loss": m["val_loss"]}
        if best != self.best():
            write_json_atomic(self.dir / "best.json", best)
        return best

    # -- saving (all ranks) ------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, marker: dict, keep_last: int) -> str:
        tag = tag_for(step)
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if self.rank == 0:  # a tag saved again (after resuming from an earlier one): not complete now
            (self.dir / tag / "COMPLETE").unlink(missing_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        _maybe_die(self.rank, step)  # worst case for tests: every file written, no COMPLETE yet
        dist.barrier()  # every rank's shard is written before COMPLETE may claim so
        if self.rank == 0:
            _fsync_tree(self.dir / tag)
            write_json_atomic(self.dir / tag / "COMPLETE",
                              {"step": step, "tag": tag, "world_size": self.world_size,
                               "time": time.time(), **marker, "files": file_sizes(self.dir / tag)})
            (self.dir / ".latest.tmp").write_text(tag + "\n")
            os.replace(self.dir / ".latest.tmp", self.dir / "latest")
            if marker.get("val_loss") is not None:
                self.reconcile_best()
            self.rotate(keep_last)
        dist.barrier()
        log.info("checkpoint %s saved in %.1fs", tag, time.time() - t0)
        return tag

    def rotate(self, keep_last: int) -> None:
        best = (self.best() or {}).get("tag")
        complete = [m["tag"] for m in self.complete()]
        for tag in complete[:-keep_last] if keep_last > 0 else []:
            if tag == best:
                continue
            # COMPLETE goes first: a kill mid-delete leaves a partial dir, removed at next start.
            (self.dir / tag / "COMPLETE").unlink(missing_ok=True)
            shutil.rmtree(self.dir / tag, ignore_errors=True)

    # -- resuming (all ranks) ----------------------------------------------------------------
    def resume_marker(self, mode: str, model_config: dict, elastic: bool = False) -> Optional[dict]:
        """The COMPLETE marker to resume from (None = fresh start), or a clear ResumeError."""
        complete = self.complete()
        if mode == "never" and self.tags():
            raise ResumeError(f"{self.dir} already holds checkpoints and run.resume=never: "
                              "use a new run.dir (or run.resume=auto to continue this run)")
        if not complete:
            if self.damaged():  # never silently start again from step 0 over a damaged run
                raise ResumeError(
                    f"every checkpoint in {self.dir} is damaged (set aside: "
                    f"{', '.join(self.damaged())}): restore their files and rename them back "
                    "(COMPLETE.damaged -> COMPLETE), or delete them to start this run.dir from step 0")
            return None
        m = complete[-1]
        if m["world_size"] != self.world_size and not elastic:
            raise ResumeError(
                f"checkpoint {m['tag']} was written by {m['world_size']} ranks, this run has "
                f"{self.world_size}: exact resume (optimizer shards + data-stream position) needs "
                f"the same number of ranks. Relaunch with {m['world_size']} ranks, or pass "
                "--run.elastic_resume=true to re-partition it onto this many (docs/training.md)")
        if m.get("model_config") not in (None, model_config):
            diff = sorted(k for k in model_config if m["model_config"].get(k) != model_config.get(k))
            raise ResumeError(f"checkpoint {m['tag']} has a different model ({', '.join(diff)} differ): "
                              "keep model.* as in the run's config.yaml or use a new run.dir")
        return m
