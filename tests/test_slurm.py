"""The cluster path on a real SLURM: slurmctld + two slurmd (n1, n2) started by the tests.

One session-scoped cluster (tests/slurm_cluster.py) is shared by every test here; the tests skip
with the reason when slurm-wlm/munge are not installed or we are not root (.ci/run installs them).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import MARKER, SlurmCluster, unavailable_reason

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "launch" / "slurm"
# The scripts ask for production-sized resources (32 CPUs, 64 GB, GPUs); a user on a small
# partition overrides them on the sbatch command line exactly like this.
SMALL = ["--cpus-per-task=1", "--mem=1000"]

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=unavailable_reason() or "")


@pytest.fixture(scope="session")
def cluster():
    with SlurmCluster() as c:
        yield c


def _state(info: list[dict[str, str]]) -> list[str]:
    return [j["JobState"] for j in info]


@pytest.mark.timeout(120)
def test_two_node_job_runs_one_task_per_node(cluster, tmp_path):
    job = cluster.sbatch(
        ["-N", "2", "-o", "out.txt", "--wrap",
         "srun bash -c 'echo task $SLURM_PROCID/$SLURM_NTASKS on $SLURMD_NODENAME'"],
        cwd=tmp_path)
    info = cluster.wait_job(job, timeout=90)
    assert _state(info) == ["COMPLETED"], info
    assert info[0]["NodeList"] == "n[1-2]"
    lines = sorted((tmp_path / "out.txt").read_text().split("\n"))
    assert [l for l in lines if l] == ["task 0/2 on n1", "task 1/2 on n2"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_stop_ends_daemons_and_running_jobs(tmp_path):
    """A second, private cluster: stop() with a job still running leaves no process behind."""
    c = SlurmCluster().start()
    try:
        job = c.sbatch(["-N", "2", "--wrap", "srun sleep 600"], cwd=tmp_path)
        c.wait_state(job, {"RUNNING"}, timeout=60)
        deadline = time.monotonic() + 30  # the srun'ed sleeps appear a moment later
        while len(c._marked_pids()) < 4 and time.monotonic() < deadline:
            time.sleep(0.3)
        daemons = [p.pid for p in c._procs.values()]
        marked = c._marked_pids()
        base = c.base
        assert len(daemons) == 4 and len(marked) >= 4
    finally:
        c.stop()
    assert not [p for p in daemons + marked if _pid_alive(p)]
    assert not base.exists()
    needle = f"{MARKER}={base}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                assert needle not in (d / "environ").read_bytes()
            except OSError:
                pass


# ------------------------------------------------------------------ sharding as a job array
def _digest(out: Path) -> dict[str, str]:
    """sha256 of every output file (the per-shard sidecars aside); manifest minus created_by."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and "_parts" not in p.relative_to(out).parts:
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                m.pop("created_by")
                data = json.dumps(m, sort_keys=True).encode()
            files[p.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return files


@pytest.mark.timeout(240)
def test_shard_array_equals_single_process_run(cluster, tmp_path):
    from lapvqa.shard import main as shard_main
    from mimic_fixtures import write_mimic_jpg_tree

    tree = write_mimic_jpg_tree(tmp_path / "mimic", n_studies=8,
                                faults=("truncated_jpeg", "missing_report", "no_split"))
    flags = ["--samples-per-shard", "3", "--no-progress"]
    (tmp_path / "logs").mkdir()
    env = {"IMAGES": str(tree.images_root), "REPORTS": str(tree.reports_dir),
           "OUT": str(tmp_path / "array"), "PYTHON": sys.executable}
    job = cluster.sbatch(["--array=0-1", *SMALL, str(SLURM_DIR / "shard.sbatch"), *flags],
                         cwd=tmp_path, env=env)
    # The single-process reference runs here while the array runs on the cluster.
    ref = tmp_path / "single"
    assert shard_main(["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
                       "--out", str(ref), "--workers", "1", "--task-index", "0",
                       "--num-tasks", "1", *flags]) == 0
    info = cluster.wait_job(job, timeout=180)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*")))
    assert sorted(_state(info)) == ["COMPLETED", "COMPLETED"], logs
    assert len({j["ArrayTaskId"] for j in info}) == 2
    # Both tasks did real work: each wrote shards (shard i belongs to task i mod 2).
    assert "task 1/2" in logs and "task 2/2" in logs, logs
    ref_digest = _digest(ref)
    assert sum(n.endswith(".tar") for n in ref_digest) >= 4
    assert _digest(tmp_path / "array") == ref_digest
