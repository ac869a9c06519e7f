"""kill -9 mid-run, damaged leftovers, then the same command again: nothing lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lapvqa.shard import main
from mimic_fixtures import write_mimic_jpg_tree
from mimic_fixtures import output_digest


def _sidecars(out):
    parts = out / "_parts"
    return sorted(p.name for p in parts.glob("*.tar.json")) if parts.is_dir() else []


@pytest.mark.timeout(240)
def test_kill9_then_resume_is_byte_identical(tmp_path, capsys):
    tree = write_mimic_jpg_tree(tmp_path / "mimic", n_studies=14, images_per_study=2)
    args = ["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
            "--samples-per-shard", "2", "--workers", "2", "--no-progress"]
    ref = tmp_path / "ref"
    assert main(args + ["--out", str(ref)]) == 0
    n_shards = len(json.loads((ref / "_parts" / "plan.json").read_text())["shards"])

    # One image becomes a FIFO: the worker that reaches it blocks (deterministically mid-run)
    # while the other worker finishes every other shard; then the whole job is killed -9.
    victim = next(tree.images_root.rglob(f"{next(iter(tree.expected_samples))}.jpg"))
    data = victim.read_bytes()
    victim.unlink()
    os.mkfifo(victim)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lapvqa.shard", *args, "--out", str(out)],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 150
        while len(_sidecars(out)) < n_shards - 1 and time.time() < deadline:
            assert proc.poll() is None, "sharder exited while an input was blocked"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(_sidecars(out)) == n_shards - 1
    assert not (out / "manifest.json").exists() and not (out / "rejects.jsonl").exists()
    victim.unlink()
    victim.write_bytes(data)

    # More damage a crash or a bad disk could leave: a flipped byte, a truncated shard, a lost
    # sidecar, a half-written temp file.
    shards = sorted(out.glob("*.tar"))
    flipped = bytearray(shards[0].read_bytes())
    flipped[600] ^= 0x55
    shards[0].write_bytes(bytes(flipped))
    shards[1].write_bytes(shards[1].read_bytes()[:5000])
    (out / "_parts" / f"{shards[2].name}.json").unlink()
    (out / f".tmp.{shards[3].name}.4242.deadbeef").write_bytes(b"partial")

    capsys.readouterr()
    assert main(args + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    # 4 redone: the blocked one + 3 damaged; everything else verified by sha256 and kept.
    assert f"this task: 4 shards written, {n_shards - 4} verified and kept" in err
    assert output_digest(out) == output_digest(ref)
    assert not list(out.rglob(".tmp.*"))
    assert main(["--verify", str(out), "--workers", "1"]) == 0


@pytest.mark.timeout(180)
def test_sigterm_stops_workers_promptly_then_resume(tmp_path):
    """SLURM preemption: SIGTERM to the sharder stops it and its workers; a re-run completes."""
    tree = write_mimic_jpg_tree(tmp_path / "mimic", n_studies=6, images_per_study=2)
    victim = next(tree.images_root.rglob(f"{next(iter(tree.expected_samples))}.jpg"))
    data = victim.read_bytes()
    victim.unlink()
    os.mkfifo(victim)  # holds one worker mid-shard
    out = tmp_path / "out"
    args = ["--images", str(tree.images_root), "--reports", str(tree.reports_dir), "--out",
            str(out), "--samples-per-shard", "2", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "lapvqa.shard", *args],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(_sidecars(out)) < 1 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # to the main process only, as SLURM's first signal
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "re-run the same command to resume" in err
    deadline = time.time() + 20  # workers and the forkserver go away too
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the sharder")
    assert not (out / "manifest.json").exists()
    victim.unlink()
    victim.write_bytes(data)
    assert main(args) == 0 and main(["--verify", str(out), "--workers", "1"]) == 0
    assert not list(out.rglob(".tmp.*"))
