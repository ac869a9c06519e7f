"""Running this task's share of the plan: worker processes, progress, finalization, summary."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ..storage import open_store
from .config import RunOptions, ShardConfig
from .inputs import discover
from .manifest import MANIFEST, check_plan_file, finalize
from .plan import ShardJob, build_plan
from .summary import print_summary
from .writer import JobContext, ShardResult, run_job

__all__ = ["run_shard", "run_finalize", "execute"]

_CTX: JobContext | None = None
_QUEUE = None


def _init_worker(ctx: JobContext, q, env: dict) -> None:
    global _CTX, _QUEUE
    _CTX, _QUEUE = ctx, q
    # A forkserver keeps the environment of the moment it started; the run's (AWS_* etc.) wins.
    os.environ.clear()
    os.environ.update(env)


def _worker_job(job: ShardJob) -> ShardResult:
    return run_job(job, _CTX, _QUEUE.put)


def _mp_context(s3: bool = False):
    # Never plain fork: the parent may hold boto3/thread state. forkserver forks from a clean,
    # pre-warmed server (botocore too when S3 is used: its import is the slow part of a client);
    # spawn where forkserver does not exist.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["lapvqa.shard._preload"] + (["boto3"] if s3 else []))
        return ctx
    return mp.get_context("spawn")


def _drain(q, bar) -> None:
    while True:
        try:
            bar.update(q.get_nowait())
        except queue_mod.Empty:
            return


def _stop(ex: ProcessPoolExecutor) -> None:
    """Error or SIGTERM: stop at once. Unfinished shards are never visible (atomic writes), and a
    re-run redoes them; waiting for running shards could outlast SLURM's kill grace period."""
    procs = list((getattr(ex, "_processes", None) or {}).values())  # shutdown() forgets them
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(10)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def execute(jobs: list[ShardJob], ctx: JobContext, workers: int, bar) -> list[ShardResult]:
    """Run jobs (whole shards) on ``workers`` processes; results in job order."""
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(j, ctx, bar.update) for j in jobs]
    mpc = _mp_context(s3=any(u.startswith("s3://") for u in (ctx.out_url, ctx.images_url)))
    q = mpc.Queue()
    results = []
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mpc, initializer=_init_worker,
                             initargs=(ctx, q, dict(os.environ))) as ex:
        pending = {ex.submit(_worker_job, j) for j in jobs}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(q, bar)
                results.extend(f.result() for f in done)
        except BaseException:
            _stop(ex)
            raise
        _drain(q, bar)
    order = {j.name: j.index for j in jobs}
    return sorted(results, key=lambda r: order[r.name])


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="img", desc="sharding", disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, smoothing=0.1, file=sys.stderr)


def _prepare(opts: RunOptions, cfg: ShardConfig):
    inputs = discover(opts.images, opts.reports, opts.metadata, cfg.labels)
    plan = build_plan(inputs, cfg)
    return inputs, plan


def _warm_workers(opts: RunOptions) -> None:
    """Start the forkserver now: its imports and tokenizer build then overlap with the CSV
    reading and planning below instead of delaying the first shard."""
    if opts.resolved_workers() > 1:
        mpc = _mp_context(s3=any(u.startswith("s3://") for u in (opts.out, opts.images)))
        if mpc.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()


def run_shard(opts: RunOptions, cfg: ShardConfig) -> int:
    t0 = time.time()
    _warm_workers(opts)
    inputs, plan = _prepare(opts, cfg)
    store = open_store(opts.out)
    check_plan_file(store, plan, cfg.settings(), opts.overwrite)
    jobs = plan.for_task(opts.task_index, opts.num_tasks)
    workers = opts.resolved_workers()
    ctx = JobContext(cfg, opts.out, opts.images, inputs.reports, plan.plan_hash,
                     opts.io_threads, opts.resume_check)
    print(f"lapvqa.shard: {inputs.kind} input, {plan.listed} images listed, {len(plan.jobs)} shards "
          f"planned; task {opts.task_index + 1}/{opts.num_tasks} does {len(jobs)} shards with "
          f"{workers} worker(s) -> {store.url('')}", file=sys.stderr)
    if inputs.split_source.startswith("hash"):
        print("lapvqa.shard: warning: no mimic-cxr-2.0.0-split.csv: using a patient-level hash "
              "split (not the official one; pass --metadata MIMIC_CXR_JPG_ROOT)", file=sys.stderr)
    # SLURM preemption/scancel sends SIGTERM: stop the workers and exit cleanly (re-run resumes).
    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    with _bar(sum(len(j.records) for j in jobs), opts.progress) as bar:
        try:
            results = execute(jobs, ctx, workers, bar)
        except BrokenProcessPool:
            print("lapvqa.shard: error: a worker process died (killed, or out of memory?); "
                  "finished shards are kept: re-run the same command to resume", file=sys.stderr)
            return 1
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, old_handler)
    manifest, missing = finalize(store, plan, cfg.settings(), inputs,
                                 known={r.name: r for r in results})
    print_summary(results, plan, manifest, missing, time.time() - t0, store.url(MANIFEST))
    return 0


def run_finalize(opts: RunOptions, cfg: ShardConfig) -> int:
    inputs, plan = _prepare(opts, cfg)
    store = open_store(opts.out)
    check_plan_file(store, plan, cfg.settings(), overwrite=False)
    from .manifest import collect

    manifest, missing = finalize(store, plan, cfg.settings(), inputs)
    if manifest is None:
        _, missing = collect(store, plan, stop_at_missing=False)
        print(f"lapvqa.shard: error: {len(missing)} of {len(plan.jobs)} shards not done yet "
              f"(first: {', '.join(missing[:5])}); run the missing tasks again", file=sys.stderr)
        return 1
    print_summary([], plan, manifest, [], 0.0, store.url(MANIFEST))
    return 0
