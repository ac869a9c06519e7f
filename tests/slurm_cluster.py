"""A real two-node SLURM cluster on one machine, for tests of the scripts in launch/slurm/.

One ``munged`` (own key, socket, pid and log under a temp folder), one ``slurmctld`` and two
``slurmd`` (``-N n1`` / ``-N n2``, distinct ports and spool folders) on loopback. Nothing is
written outside the temp folder and every process the cluster started is ended on ``stop()``:
the daemons by pid, and any job process left behind by the environment marker every daemon and
job inherits (``LAPVQA_SLURM_TEST_CLUSTER=<base dir>``).

Usage (tests/test_slurm.py)::

    reason = unavailable_reason()          # None, or why the tests must skip
    with SlurmCluster() as cluster:        # waits until both nodes are idle
        job = cluster.sbatch(["-N", "2", "--wrap", "srun hostname"], cwd=tmp)
        info = cluster.wait_job(job)       # {"JobState": "COMPLETED", ...}
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
MARKER = "LAPVQA_SLURM_TEST_CLUSTER"
NODES = ("n1", "n2")
PARTITION = "debug"
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which is not on every user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why a real cluster cannot run here (None when it can)."""
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        return ("SLURM/munge not installed (missing: " + ", ".join(missing) + "); "
                "install with `apt-get install slurm-wlm munge` (as .ci/run does)")
    if os.geteuid() != 0:
        # slurmd launches job steps through setuid/setgid; without root only the daemons'
        # own user could run jobs and munged refuses some checks, so we keep it simple.
        return "the SLURM test cluster needs root (slurmd must launch job steps)"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct currently-free TCP ports on 127.0.0.1 (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class ClusterPaths:
    base: Path

    def __post_init__(self) -> None:
        for sub in ("state", "log", "run", *(f"spool/{n}" for n in NODES)):
            (self.base / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        # munged wants its socket folder searchable by all (clients of any user connect).
        (self.base / "munge").mkdir(mode=0o755, exist_ok=True)
        self.base.chmod(0o755)

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.base / "munge" / "munge.socket"

    @property
    def munge_key(self) -> Path:
        return self.base / "munge" / "munge.key"

    def log(self, name: str) -> Path:
        return self.base / "log" / f"{name}.log"


def render_slurm_conf(paths: ClusterPaths, ctld_port: int, node_ports: list[int],
                      cpus: int, mem_mb: int) -> str:
    """slurm.conf for n1/n2 on localhost; everything cluster-local under paths.base."""
    b = paths.base
    lines = [
        "ClusterName=lapvqatest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={node_ports[0]}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also sets how long a requeued job waits before it may start again
        # (default 120 s); short here so the preemption test requeues within seconds.
        f"AuthInfo=socket={paths.munge_socket},cred_expire=5",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={b}/state",
        f"SlurmdSpoolDir={b}/spool/%n",
        f"SlurmctldPidFile={b}/run/slurmctld.pid",
        f"SlurmdPidFile={b}/run/slurmd-%n.pid",
        # No LogFile: the daemons run with -D and log to stderr, which the fixture keeps in
        # log/<daemon>.log (a crash message lands there too).
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # Plain process tracking, no cgroups: works in containers and under gVisor.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        # Frequent scheduling passes: a requeued job starts as soon as it is eligible.
        "SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=0",
        # Take the configured CPUs/memory as given (both slurmd see the same host).
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "JobRequeue=1",
        # Keep finished jobs visible to `scontrol show job` (no accounting database here).
        "MinJobAge=3600",
        "KillWait=10",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        "MessageTimeout=30",
        f"PlugStackConfig={b}/plugstack.conf",
    ]
    for name, port in zip(NODES, node_ports):
        lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                     f"CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN")
    lines.append(f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES "
                 "MaxTime=INFINITE State=UP OverSubscribe=NO")
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    """Start with ``start()`` (or ``with``); ``stop()`` always ends every process it started."""

    cpus: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))
    mem_mb: int = 4000
    start_timeout: float = 60.0
    base: Path | None = None
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.base = Path(tempfile.mkdtemp(prefix="lapvqa-slurm-"))
        self.paths = ClusterPaths(self.base)
        try:
            self._write_files()
            self._start_munged()
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.paths.conf)])
            self._wait_for(lambda: self._ok(["scontrol", "ping"]), "slurmctld to answer")
            for node in NODES:
                self._start_daemon(f"slurmd-{node}",
                                   ["slurmd", "-D", "-N", node, "-f", str(self.paths.conf)])
            self._wait_for(self._nodes_idle, "nodes n1,n2 to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_files(self) -> None:
        key = self.paths.munge_key
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        self.paths.conf.write_text(
            render_slurm_conf(self.paths, ctld_port, node_ports, self.cpus, self.mem_mb))
        (self.base / "plugstack.conf").write_text("")

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for clients and jobs: points at this cluster's slurm.conf."""
        env = dict(os.environ)
        # A job inherits the submitter's environment: drop any outer SLURM job's variables.
        for k in list(env):
            if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")):
                del env[k]
        env["SLURM_CONF"] = str(self.paths.conf)
        env[MARKER] = str(self.base)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        env.update(extra or {})
        return env

    def _start_munged(self) -> None:
        m = self.base / "munge"
        self._start_daemon("munged", [
            "munged", "--foreground", "--force", f"--socket={self.paths.munge_socket}",
            f"--key-file={self.paths.munge_key}", f"--pid-file={m}/munged.pid",
            f"--seed-file={m}/munged.seed", f"--log-file={m}/munged.log",
        ])
        self._wait_for(self.paths.munge_socket.exists, "munged's socket")

    def _start_daemon(self, name: str, argv: list[str]) -> None:
        argv = [_which(argv[0]) or argv[0], *argv[1:]]
        out = open(self.paths.log(name), "ab")
        self._procs[name] = subprocess.Popen(
            argv, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _wait_for(self, check, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                       f"{what}\n{self.logs_tail()}")
            if check():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out waiting for {what}\n{self.logs_tail()}")

    def _nodes_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def stop(self) -> None:
        """Cancel jobs, stop daemons, end any leftover job process; remove the temp folder."""
        if self.base is None:
            return
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._run(["scancel", "--full", "--user", "root"], check=False)
            self._wait_quiet(timeout=15)
        for name in [n for n in self._procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            proc = self._procs.get(name)
            if proc is not None:
                _terminate(proc)
        for pid in self.marked_pids():
            _kill_pid(pid)
        self._procs.clear()
        if os.environ.get("LAPVQA_KEEP_SLURM_DIR"):
            print(f"slurm test cluster kept at {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def _wait_quiet(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self._run(["squeue", "-h", "-o", "%i"], check=False).stdout
            if not out.strip():
                return
            time.sleep(0.5)

    def daemon_pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    def marked_pids(self) -> list[int]:
        """Processes (job steps, their children) that inherited this cluster's marker."""
        needle = f"{MARKER}={self.base}".encode() + b"\0"
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if needle in (d / "environ").read_bytes() + b"\0":
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    # ---------------------------------------------------------------- clients
    def _run(self, argv: list[str], check: bool = True, timeout: float = 60,
             env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
             ) -> subprocess.CompletedProcess:
        argv = [_which(argv[0]) or argv[0], *argv[1:]]
        proc = subprocess.run(argv, env=env or self.env(), cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}\n{self.logs_tail()}")
        return proc

    def _ok(self, argv: list[str]) -> bool:
        return self._run(argv, check=False, timeout=20).returncode == 0

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command (scontrol, scancel, ...) against this cluster."""
        return self._run(argv, **kw)

    def sbatch(self, args: list[str], cwd: str | os.PathLike,
               env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id (``--parsable``)."""
        out = self._run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd).stdout
        return out.strip().split(";")[0]

    def job_info(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` as dicts: one per job (an array gives one per task)."""
        out = self._run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return [_parse_kv(line) for line in out.splitlines() if line.strip()]

    def wait_job(self, job_id: str, timeout: float = 180, poll: float = 1.0
                 ) -> list[dict[str, str]]:
        """Wait until every task of the job is in a terminal state; returns job_info()."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info and all(j.get("JobState") in TERMINAL_STATES for j in info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout}s: "
                                   f"{[(j.get('JobId'), j.get('JobState'), j.get('Reason')) for j in info]}"
                                   f"\n{self.logs_tail()}")
            time.sleep(poll)

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> dict[str, str]:
        """Wait until the (single) job is in one of ``states``."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info and info[0].get("JobState") in states:
                return info[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} never reached {states}: {info}")
            time.sleep(0.5)

    def logs_tail(self, lines: int = 15) -> str:
        if self.base is None or not (self.base / "log").exists():
            return ""
        parts = []
        for p in sorted((self.base / "log").glob("*.log")):
            tail = p.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {p.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _parse_kv(line: str) -> dict[str, str]:
    # `scontrol -o` prints Key=Value pairs separated by spaces; values may hold '=' but no
    # spaces except in a few fields (Command, WorkDir with spaces) we do not rely on.
    return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line))


def _terminate(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
