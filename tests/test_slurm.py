"""The cluster path on a real SLURM: slurmctld + two slurmd (n1, n2) started by the tests.

One session-scoped cluster (tests/slurm_cluster.py) is shared by every test here; the tests skip
with the reason when slurm-wlm/munge are not installed or we are not root (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimic_fixtures import output_digest
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
        while len(c.marked_pids()) < 4 and time.monotonic() < deadline:
            time.sleep(0.3)
        daemons = c.daemon_pids()
        marked = c.marked_pids()
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
    ref_digest = output_digest(ref)
    assert sum(n.endswith(".tar") for n in ref_digest) >= 4
    assert output_digest(tmp_path / "array") == ref_digest


# ------------------------------------------------------------------ multi-node training
BIN = Path(sys.executable).parent
# Same model, data and schedule for every run below; only run.dir differs.
TRAIN_CFG = dict(train__max_steps=8, checkpoint__every_steps=4, validate__every_steps=4,
                 run__log_sample_keys=True)


def _train_env(**extra) -> dict[str, str]:
    # The venv's python/deepspeed first on PATH: the job inherits this environment (--export=ALL).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return {**env, **extra}


def _submit_pretrain(cluster, cfg: str, logs: Path, *sbatch_args: str, overrides=(), **env: str) -> str:
    """Submit as a user does, from the checkout; the log goes to ``logs`` instead of ./logs.
    The GPU/task/CPU directives are overridden for this CPU cluster (one CPU rank per node)."""
    logs.mkdir(exist_ok=True)
    return cluster.sbatch(["-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0", *SMALL,
                           f"--output={logs}/%x-%j.out", *sbatch_args,
                           str(SLURM_DIR / "pretrain.sbatch"), *overrides],
                          cwd=REPO, env=_train_env(CONFIG=cfg, **env))


def _job_log(logs: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("*")))


def _metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows); a step logged twice (resumed) keeps its last row."""
    train, val = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        (val if "val_loss" in row else train)[row["step"]] = row
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def _trajectory(run: Path) -> list[tuple]:
    train, val = _metrics(run)
    return ([(r["step"], r["batch_hash"], round(r["loss"], 5)) for r in train]
            + [(r["step"], round(r["val_loss"], 5)) for r in val])


def _layout(run: Path) -> list[str]:
    """Relative paths of the run folder; TensorBoard file names (host, time) reduced to tb/."""
    out = set()
    for p in run.rglob("*"):
        rel = p.relative_to(run)
        out.add("tb/" if rel.parts[0] == "tb" else rel.as_posix() + ("/" if p.is_dir() else ""))
    return sorted(out)


def _resolved_config(run: Path) -> dict:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run"].pop("dir")
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _no_logs_dir_left_in_checkout():
    """pretrain.sbatch runs `mkdir -p logs` in the submit dir (the checkout): tidy it up."""
    existed = (REPO / "logs").exists()
    yield
    if not existed:
        try:
            (REPO / "logs").rmdir()
        except OSError:
            pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from train_fixtures import write_shards

    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def two_node_run(cluster, shards, tmp_path_factory):
    """The same tiny run twice: sbatch -N 2 pretrain.sbatch, and deepspeed --num_gpus 2 here."""
    from train_fixtures import write_config

    d = tmp_path_factory.mktemp("pretrain")
    cfg = write_config(d / "slurm.yaml", str(d / "slurm_run"), shards, **TRAIN_CFG)
    ds_cfg = write_config(d / "ds.yaml", str(d / "ds_run"), shards, **TRAIN_CFG)
    # The script's extra-srun-flags variable (containers on real clusters): --label tags lines.
    job = _submit_pretrain(cluster, cfg, d / "logs", LAPVQA_SRUN_ARGS="--label")
    with open(d / "ds.log", "w") as log:
        ds = subprocess.Popen([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port",
                               str(_free_port()), str(REPO / "launch" / "train.py"), "--config",
                               ds_cfg], cwd=REPO, env=_train_env(), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = cluster.wait_job(job, timeout=300)
        ds_code = ds.wait(timeout=300)
    finally:
        if ds.poll() is None:
            os.killpg(ds.pid, signal.SIGKILL)
            ds.wait()
    return dict(job=job, info=info[0], run=d / "slurm_run", log=_job_log(d / "logs"),
                ds_run=d / "ds_run", ds_code=ds_code, ds_log=(d / "ds.log").read_text())


@pytest.mark.timeout(400)
def test_pretrain_two_nodes_one_rank_each_matches_deepspeed(cluster, two_node_run):
    r = two_node_run
    assert r["info"]["JobState"] == "COMPLETED", r["log"][-4000:]
    assert r["ds_code"] == 0, r["ds_log"][-4000:]
    # One task on each node, through the script's own srun line (step 0 launched on n1 and n2).
    assert r["info"]["NodeList"] == "n[1-2]" and r["info"]["NumTasks"] == "2"
    for node in ("n1", "n2"):
        assert f"launch task StepId={r['job']}.0 " in cluster.paths.log(f"slurmd-{node}").read_text()
    assert "master 127.0.0.1:" in r["log"], r["log"][-2000:]  # n1's NodeAddr, from the script
    assert any(line.startswith("1: ") for line in r["log"].splitlines())  # LAPVQA_SRUN_ARGS
    start = json.loads((r["run"] / "events.jsonl").read_text().splitlines()[0])
    assert (start["launcher"], start["world_size"]) == ("slurm", 2)
    # The two nodes see disjoint data.
    keys = [[k for line in (r["run"] / "keys" / f"rank{i}.jsonl").read_text().splitlines()
             for k in json.loads(line)["keys"]] for i in (0, 1)]
    assert keys[0] and len(keys[0]) == len(keys[1])
    assert not set(keys[0]) & set(keys[1])
    train, val = _metrics(r["run"])
    assert [row["step"] for row in train] == list(range(1, 9))
    assert train[-1]["loss"] < train[0]["loss"] - 1.0 and len(val) == 2
    # The run folder is the one `deepspeed --num_gpus 2` makes: same files, config, batches, losses.
    assert _layout(r["run"]) == _layout(r["ds_run"])
    assert _resolved_config(r["run"]) == _resolved_config(r["ds_run"])
    assert _trajectory(r["run"]) == _trajectory(r["ds_run"])
    ds_keys = [(r["ds_run"] / "keys" / f"rank{i}.jsonl").read_text() for i in (0, 1)]
    assert [(r["run"] / "keys" / f"rank{i}.jsonl").read_text() for i in (0, 1)] == ds_keys


def _preempt_signal() -> tuple[str, list[str]]:
    """The signal pretrain.sbatch asks for (#SBATCH --signal=[B:]SIG@T) and scancel's target."""
    import re

    text = (SLURM_DIR / "pretrain.sbatch").read_text()
    m = re.search(r"^#SBATCH\s+--signal=(B:)?(\w+)@", text, re.M)
    if not m:
        return "USR1", []
    return m.group(2), (["--batch"] if m.group(1) else [])


@pytest.mark.timeout(400)
def test_preemption_signal_checkpoints_requeues_and_resumes_exactly(cluster, shards,
                                                                      two_node_run, tmp_path):
    from train_fixtures import write_config

    run = tmp_path / "run"
    # A short sleep per step only widens the window in which the signal lands mid-run.
    cfg = write_config(tmp_path / "c.yaml", str(run), shards, debug__step_sleep_s=0.5,
                       **TRAIN_CFG)
    job = _submit_pretrain(cluster, cfg, tmp_path / "logs")
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").exists() and len(_metrics(run)[0]) >= 2):
        assert time.monotonic() < deadline, _job_log(tmp_path / "logs")[-4000:]
        assert cluster.job_info(job)[0]["JobState"] in ("PENDING", "RUNNING"), _job_log(tmp_path / "logs")
        time.sleep(0.2)
    sig, target = _preempt_signal()
    cluster.run(["scancel", f"--signal={sig}", *target, job])
    info = cluster.wait_job(job, timeout=300)[0]
    log = _job_log(tmp_path / "logs")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert "preempted" in kinds and "resume" in kinds, kinds
    stopped = next(e["step"] for e in events if e["event"] == "preempted")
    resumed = next(e["step"] for e in events if e["event"] == "resume")
    assert 2 <= stopped < 8 and resumed == stopped, events
    # The requeued job resumed (not restarted) and saw exactly the uninterrupted run's batches.
    assert _trajectory(run) == _trajectory(two_node_run["run"])
    # docs/slurm.md step 5: the run goes on with ONE node (resubmitted with -N 1, elastic resume)
    job = _submit_pretrain(cluster, cfg, tmp_path / "logs1", "-N", "1", overrides=(
        "--train.max_steps=10", "--run.elastic_resume=true", "--debug.step_sleep_s=0"))
    info = cluster.wait_job(job, timeout=300)[0]
    assert info["JobState"] == "COMPLETED", _job_log(tmp_path / "logs1")[-4000:]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    last = [e for e in events if e["event"] == "resume"][-1]
    assert (last["world_size"], last["elastic_from_world_size"], last["step"]) == (1, 2, 8), last
    assert [r["step"] for r in _metrics(run)[0]][-2:] == [9, 10]
