"""The cluster path on a real SLURM: slurmctld + two slurmd (n1, n2) started by the tests.

One session-scoped cluster (tests/slurm_cluster.py) is shared by every test here; the tests skip
with the reason when slurm-wlm/munge are not installed or we are not root (.ci/run installs them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from slurm_cluster import MARKER, SlurmCluster, unavailable_reason

REPO = Path(__file__).resolve().parent.parent

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
