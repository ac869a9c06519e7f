"""End-to-end trainer runs on CPU: 2 gloo ranks under deepspeed, torchrun (two "nodes"), SLURM env
and a plain process. Runs are shared between assertions to keep the file within its budget.

reference      deepspeed, 2 ranks, 12 steps, uninterrupted (NaN injected at step 6)
chain          same config in another run dir: killed inside the save of step 8 (rank 1 SIGKILLs
               itself), then SIGKILLed (all processes) after step 9, then run to the end
               -> metrics (loss, batch_hash, val_loss) and per-rank sample keys equal reference's
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

import numpy as np
import pytest
import torch

from s3_fixtures import moto_endpoint, moto_s3  # noqa: F401  (fixtures)
from train_fixtures import REPO, train_shards, write_config  # noqa: F401  (fixture)

from lapvqa.train.dist import shm_buffer_path

BIN = Path(sys.executable).parent
TRAIN = str(REPO / "launch" / "train.py")
COMMON = dict(train__max_steps=12, checkpoint__every_steps=4, validate__every_steps=4,
              checkpoint__keep_last=1, debug__nan_steps=[6], run__log_sample_keys=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _deepspeed(cfg: str, *over: str, port: int | None = None, ranks: int = 2) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port or _port()), TRAIN,
            "--config", cfg, *over]


def _start(cmd: list[str], log: Path, env=None, cwd=REPO) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out; log:\n{log.read_text()[-4000:]}")
    return code, log.read_text()


def _run(cmd, log: Path, timeout=240, env=None) -> tuple[int, str]:
    return _finish(_start(cmd, log, env), log, timeout)


def _rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    from lapvqa.train.plot import read_metrics
    return read_metrics(run_dir)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout=240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in _rows(run_dir)[0]):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} never logged (exit {proc.poll()})")


def _complete(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("global_step*/COMPLETE"))


@pytest.fixture(scope="module")
def reference(train_shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    cfg = write_config(d / "c.yaml", str(d / "run"), train_shards, **COMMON)
    code, out = _run(_deepspeed(cfg), d / "log.txt")
    assert code == 0, out[-4000:]
    return d / "run", out


@pytest.mark.timeout(300)
def test_reference_run_learns_and_writes_the_run_dir(reference, train_shards):
    run, out = reference
    train, val = _rows(run)
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:
        for k in ("loss", "lr", "grad_norm", "images_per_s", "tokens_per_s", "mfu", "data_wait",
                  "data_errors", "batch_hash"):
            assert k in r
    # NaN injected at step 6: skipped, counted, warned; training continues
    assert train[5]["loss"] is None and train[5]["nonfinite_skipped"] == 1
    assert "non-finite" in out and train[-1]["nonfinite_skipped"] == 1
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert [v["step"] for v in val] == [4, 8, 12] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert all(v["val_samples"] == 32 for v in val)  # the whole validate split, once
    assert len({r["batch_hash"] for r in train}) == 12
    # run dir layout: resolved config, COMPLETE checkpoints, latest, best (kept through rotation)
    ck = run / "checkpoints"
    assert (run / "config.yaml").exists() and list((run / "tb").glob("events.out.tfevents.*"))
    assert _complete(run) == ["global_step12"]  # keep_last=1, and 12 is also the best
    assert (ck / "latest").read_text().strip() == "global_step12"
    best = json.loads((ck / "best.json").read_text())
    assert best == {"tag": "global_step12", "step": 12, "val_loss": val[-1]["val_loss"]}
    marker = json.loads((ck / "global_step12" / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and marker["step"] == 12 and marker["model_config"]["image_size"] == 64
    # the model-states file loads with weights_only=True (lapvqa.consolidate relies on it)
    import torch
    states = torch.load(ck / "global_step12" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=True)
    assert states["step"] == 12 and len(states["data_state"]["ranks"]) == 2
    assert states["config"]["train"]["max_steps"] == 12 and "module" in states
    # provenance: the manifest's hash in the checkpoint and its marker, and the release card finds it
    import hashlib
    from lapvqa.release.card import manifest_sha256
    sha = hashlib.sha256((Path(train_shards) / "manifest.json").read_bytes()).hexdigest()
    assert states["manifest_sha256"] == marker["manifest_sha256"] == manifest_sha256(states) == sha
    # ranks read disjoint samples at every step
    keys = [[json.loads(l)["keys"] for l in (run / "keys" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]
    assert all(not set(a) & set(b) for a, b in zip(*keys))
    from lapvqa.train.plot import main as plot_main
    assert plot_main([str(run), "--out", str(run / "p.png")]) == 0 and (run / "p.png").stat().st_size > 0


@pytest.mark.timeout(300)
def test_compiled_blocks_under_deepspeed_match_eager(reference, train_shards, tmp_path):
    """train.compile under ZeRO-2 with 2 ranks (aot_eager: dynamo + AOTAutograd traces of every
    block, the graphs inductor would compile on a GPU): the same losses as the eager reference."""
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "run"), train_shards, **COMMON,
                       train__compile=True, train__compile_backend="aot_eager")
    code, out = _run(_deepspeed(cfg), tmp_path / "log.txt")
    assert code == 0, out[-4000:]
    assert "torch.compile(backend=aot_eager)" in out
    ref, got = _rows(reference[0])[0], _rows(tmp_path / "run")[0]
    assert [r["batch_hash"] for r in got] == [r["batch_hash"] for r in ref]
    for a, b in zip(ref, got):
        if a["loss"] is None:  # the injected NaN step, skipped in both
            assert b["loss"] is None
            continue
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-4)


@pytest.mark.timeout(300)
def test_kernel_custom_ops_in_compiled_blocks_under_deepspeed(reference, train_shards, tmp_path):
    """What crashed in dynamo on the H200 (compile + the Triton kernel), now under ZeRO-2 with 2
    ranks: the kernel (Triton interpreter) as custom ops inside aot_eager-traced blocks. Steps
    1-3 see only warm-up learning rates (warmup_steps=2), so they match the reference's steps."""
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "run"), train_shards, **COMMON,
                       train__compile=True, train__compile_backend="aot_eager")
    over = ["--train.max_steps=3", "--validate.every_steps=0", "--validate.at_end=false",
            "--checkpoint.every_steps=100", "--debug.nan_steps=[]"]
    code, out = _run(_deepspeed(cfg, *over), tmp_path / "log.txt",
                     env=_env(LAPVQA_ATTENTION="triton", TRITON_INTERPRET="1"))
    assert code == 0, out[-4000:]
    ref, got = _rows(reference[0])[0][:3], _rows(tmp_path / "run")[0]
    assert [r["batch_hash"] for r in got] == [r["batch_hash"] for r in ref]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    # the backward is the kernel's (its sums run in another order than SDPA's): not bit-equal
    assert any(a["grad_norm"] != b["grad_norm"] for a, b in zip(ref, got))


@pytest.mark.timeout(600)
def test_kill_in_save_then_sigkill_then_resume_is_exact(reference, train_shards, tmp_path):
    ref_run, _ = reference
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", str(run), train_shards, **COMMON)
    # 1) rank 1 dies inside the save of step 8: that checkpoint must never be used
    code, out = _run(_deepspeed(cfg), tmp_path / "log1.txt", env=_env(LAPVQA_FAULT_KILL_IN_SAVE="1:8"))
    assert code != 0 and "dies inside the save of step 8" in out
    assert _complete(run) == ["global_step4"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step4"
    # 2) same command: resumes from step 4 (partial global_step8 removed); SIGKILL everything
    #    mid-run after step 9 (between checkpoints 8 and 12)
    port = _port()
    proc = _start(_deepspeed(cfg, "--debug.step_sleep_s=0.3", port=port), tmp_path / "log2.txt")
    _wait_for_step(run, 9, proc)
    shm = [shm_buffer_path(r, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
    assert not any(os.path.exists(p) for p in shm)  # names released while running ...
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any(os.path.exists(p) for p in shm)  # ... so a SIGKILL leaks no /dev/shm buffer
    out2 = (tmp_path / "log2.txt").read_text()
    assert "removing partial checkpoint" in out2 and "resumed from global_step4" in out2
    assert "global_step8" in _complete(run)
    # 3) same command again: resumes from step 8, runs to the end
    code, out3 = _run(_deepspeed(cfg), tmp_path / "log3.txt")
    assert code == 0 and "resumed from global_step8" in out3, out3[-4000:]
    ref_train, ref_val = _rows(ref_run)
    train, val = _rows(run)
    assert [(r["step"], r["batch_hash"], r["loss"]) for r in train] == \
        [(r["step"], r["batch_hash"], r["loss"]) for r in ref_train]  # bit-exact on CPU
    assert [(v["step"], v["val_loss"]) for v in val] == [(v["step"], v["val_loss"]) for v in ref_val]
    for r in (0, 1):
        assert (run / "keys" / f"rank{r}.jsonl").read_text() == (ref_run / "keys" / f"rank{r}.jsonl").read_text()
    events = [json.loads(l)["event"] for l in (run / "events.jsonl").read_text().splitlines()]
    assert events.count("resume") == 2


@pytest.mark.timeout(600)
def test_elastic_resume_onto_one_rank_continues_the_reference(reference, train_shards, tmp_path):
    """2 ranks die in the save of step 8; the run comes back on ONE rank with 2 data workers and
    run.elastic_resume: ZeRO-2 state re-partitioned through DeepSpeed's universal format, the data
    stream re-dealt (old stream s -> new stream s % 2, so here the very same samples per step), the
    global batch kept by grad_accum_steps=2. Steps 5-12 then equal the uninterrupted 2-rank
    reference up to summation order: weights, AdamW moments, step and LR schedule all came over."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", str(run), train_shards, **COMMON)
    code, out = _run(_deepspeed(cfg), tmp_path / "log1.txt", env=_env(LAPVQA_FAULT_KILL_IN_SAVE="1:8"))
    assert code != 0 and _complete(run) == ["global_step4"]
    code, out = _run(_deepspeed(cfg, ranks=1), tmp_path / "log2.txt")
    assert code == 2 and "--run.elastic_resume=true" in out, out[-3000:]
    code, out = _run(_deepspeed(cfg, "--run.elastic_resume=true", "--data.num_workers=2", ranks=1),
                     tmp_path / "log3.txt")
    assert code == 0, out[-4000:]
    assert "grad_accum_steps 1 -> 2" in out and "from 2 ranks re-partitioned onto 1" in out
    assert not (run / "checkpoints" / "universal").exists(), "the converted copy is removed"
    ref_run, _ = reference
    (ref_train, ref_val), (train, val) = _rows(ref_run), _rows(run)
    assert [r["step"] for r in train] == list(range(1, 13))
    for a, b in zip(ref_train[4:], train[4:]):
        if a["loss"] is None:  # the injected NaN step, skipped in both
            assert b["loss"] is None
            continue
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
    assert [v["val_loss"] for v in val] == pytest.approx([v["val_loss"] for v in ref_val], rel=1e-4)
    ref_keys = [[json.loads(l)["keys"] for l in (ref_run / "keys" / f"rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    keys = [json.loads(l)["keys"] for l in (run / "keys" / "rank0.jsonl").read_text().splitlines()]
    assert len(keys) == 12 and keys[:4] == ref_keys[0][:4]  # rank 0's record of steps 1-4 is kept
    gone = [json.loads(l)["step"] for l in (run / "keys" / "rank1.jsonl").read_text().splitlines()]
    assert gone == [1, 2, 3, 4], "rank 1's rows after the checkpoint (its killed steps) are dropped"
    assert [sorted(k) for k in keys[4:]] == [sorted(a + b) for a, b in zip(*ref_keys)][4:]
    marker = json.loads((run / "checkpoints" / "global_step12" / "COMPLETE").read_text())
    assert marker["world_size"] == 1 and marker["global_batch"] == 8
    events = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines()]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["elastic_from_world_size"] == 2 and resume["world_size"] == 1
    # and back onto 2 ranks for two more steps (global batch 8 again from 2 x 4 x 1)
    code, out = _run(_deepspeed(cfg, "--run.elastic_resume=true", "--train.max_steps=14"),
                     tmp_path / "log4.txt")
    assert code == 0 and "from 1 ranks re-partitioned onto 2" in out, out[-4000:]
    assert "grad_accum_steps" not in out  # 2 x 4 x 1 is the global batch of the config
    rows = [json.loads(l) for r in (0, 1) for l in (run / "keys" / f"rank{r}.jsonl").read_text().splitlines()]
    epoch1 = keys[8:] + [r["keys"] for r in rows if r["step"] > 12]  # steps 9-14: 6 x 8 of 64 samples
    flat = [k for step in epoch1 for k in step]
    assert len(flat) == 48 and len(set(flat)) == 48, "no sample twice within the epoch"
    assert all(r["loss"] is not None for r in _rows(run)[0][12:])


def _plain(cfg: str, *over: str) -> list[str]:
    return [sys.executable, TRAIN, "--config", cfg, *over]


@pytest.mark.timeout(300)
def test_two_nodes_on_loopback_see_disjoint_data_bf16(train_shards, tmp_path):
    """Two torchrun launchers (node ranks 0 and 1, one rank each) on 127.0.0.1, bf16 on CPU."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", str(run), train_shards, train__max_steps=5,
                       train__precision="bf16", validate__every_steps=0, run__log_sample_keys=True,
                       checkpoint__every_steps=100, model__overrides={"pixel_norm": "pixel"},
                       model__pixel_stats_samples=30, debug__nan_steps=[3])
    port = _port()
    procs = [_start([str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i),
                     "--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN, "--config", cfg],
                    tmp_path / f"node{i}.txt") for i in (0, 1)]
    outs = []
    for i, p in enumerate(procs):
        code, out = _finish(p, tmp_path / f"node{i}.txt", 240)
        assert code == 0, out[-4000:]
        outs.append(out)
    keys = [[k for l in (run / "keys" / f"rank{r}.jsonl").read_text().splitlines() for k in json.loads(l)["keys"]]
            for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 20
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0])) == 20
    start = json.loads((run / "events.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["precision"] == "bf16"
    train, val = _rows(run)
    assert len(train) == 5 and val[-1]["val_samples"] == 32
    # bf16 NaN step: the (batched, lapvqa.train.ds_patches) overflow check skips the update on
    # both ranks and the weights stay finite: later steps learn on
    assert "overflow check batched" in outs[0] and "OVERFLOW! Skipping step" in outs[0]
    assert train[2]["loss"] is None and train[-1]["nonfinite_skipped"] == 1
    assert all(r["loss"] is not None and np.isfinite(r["loss"]) for r in train[3:])
    assert json.loads((run / "checkpoints" / "global_step5" / "COMPLETE").read_text())["precision"] == "bf16"
    # pixel_norm: pixel -> both ranks measured their halves of the first 30 training images; the
    # all-reduced maps equal the maps of those images read straight from the shards
    from lapvqa.release.zero import open_checkpoint
    buffers = open_checkpoint(str(run / "checkpoints" / "global_step5")).buffers
    mean, std = _first_train_images_stats(train_shards, 30, 64)
    got_mean = buffers["vision_encoder.pixel_mean_map"].float()[0, 0]
    got_std = buffers["vision_encoder.pixel_std_map"].float()[0, 0]
    torch.testing.assert_close(got_mean, mean, rtol=1e-2, atol=1e-3)  # bf16 buffers: ~3 digits
    torch.testing.assert_close(got_std, std, rtol=1e-2, atol=1e-3)
    assert float((mean - got_mean).abs().max()) < 0.01 and float(mean.std()) > 0.05  # a real map


@pytest.mark.timeout(240)
def test_run_dir_not_shared_by_the_nodes_fails_the_start(train_shards, tmp_path):
    """Two "nodes" whose run.dir is not the same folder (a relative path, each node in its own
    working directory -- like node-local scratch): refused at start with exit 2 on both, instead
    of checkpoints that cannot be resumed hours later."""
    cfg = write_config(tmp_path / "c.yaml", "run", train_shards, train__max_steps=2)
    port = _port()
    procs = []
    for i in (0, 1):
        (tmp_path / f"node{i}").mkdir()
        procs.append(_start([str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
                             "--node_rank", str(i), "--master_addr", "127.0.0.1", "--master_port",
                             str(port), TRAIN, "--config", cfg], tmp_path / f"node{i}.txt",
                            cwd=tmp_path / f"node{i}"))
    outs = [_finish(p, tmp_path / f"node{i}.txt", 180) for i, p in enumerate(procs)]
    assert all(code != 0 for code, _ in outs), outs[0][1][-3000:]
    assert "run.dir is not one folder for all ranks" in outs[0][1], outs[0][1][-3000:]
    assert f"rank 1 on {socket.gethostname()} ({tmp_path / 'node1' / 'run'})" in outs[0][1]
    assert not list((tmp_path / "node0" / "run").glob("checkpoints/*")), "nothing was trained"


def _first_train_images_stats(shards: str, n: int, size: int):
    """Per-pixel mean and std (+ the trainer's eps) of the first n train samples in manifest order."""
    import tarfile

    from lapvqa.data.transform import decode_image
    from lapvqa.train.pixel_stats import STD_EPS
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    images = []
    for name in names:
        with tarfile.open(Path(shards) / name) as tar:
            images += [decode_image(tar.extractfile(m).read(), size) for m in tar if m.name.endswith(".jpg")]
    x = torch.from_numpy(np.stack(images[:n])).double() / 255
    mean, var = x.mean(0), x.var(0, unbiased=False)
    return mean.float(), (var + STD_EPS ** 2).sqrt().float()


@pytest.mark.timeout(300)
def test_srun_environment_and_s3_shards(train_shards, moto_s3, tmp_path):
    """One task as srun starts it (SLURM_* only), reading shards from moto_server's S3."""
    from lapvqa.storage import open_store
    store = open_store(moto_s3 + "/shards")
    for p in sorted(Path(train_shards).iterdir()):
        if p.is_file():
            store.put_file_atomic(p.name, p)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", str(run), moto_s3 + "/shards", train__max_steps=3,
                       validate__every_steps=3, validate__max_samples=8, data__num_workers=2)
    env = _env(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(_port()))
    code, out = _run(_plain(cfg), tmp_path / "log.txt", env=env)
    assert code == 0, out[-4000:]
    assert "via slurm" in out
    train, val = _rows(run)
    assert len(train) == 3 and val[0]["val_samples"] == 8 and train[-1]["data_errors"] == 0


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_then_exit_75_and_no_silent_restart(train_shards, reference, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", str(run), train_shards, train__max_steps=40,
                       debug__step_sleep_s=0.3, validate__every_steps=0, validate__at_end=False,
                       checkpoint__every_steps=100)
    proc = _start(_plain(cfg), tmp_path / "log.txt")
    _wait_for_step(run, 2, proc)
    # to the whole process group, DataLoader workers included (as launchers and srun do)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = _finish(proc, tmp_path / "log.txt", 120)
    assert code == 75, out[-3000:]
    (tag,) = _complete(run)
    step = int(tag.removeprefix("global_step"))
    assert 2 <= step < 40 and _rows(run)[0][-1]["step"] == step
    assert json.loads((run / "events.jsonl").read_text().splitlines()[-1])["event"] == "preempted"
    # a run dir with checkpoints never silently starts again from step 0
    code, out = _run(_plain(cfg, "--run.resume=never"), tmp_path / "log2.txt")
    assert code == 2 and "already holds checkpoints and run.resume=never" in out
    # resuming on another world size is refused with a clear message (reference ran on 2 ranks)
    ref_run, _ = reference
    ref_cfg = write_config(tmp_path / "ref.yaml", str(ref_run), train_shards, **COMMON)
    code, out = _run(_plain(ref_cfg), tmp_path / "log3.txt")
    assert code == 2 and "was written by 2 ranks, this run has 1" in out, out[-3000:]


@pytest.mark.timeout(300)
def test_checkpoint_damaged_after_saving_is_set_aside_and_the_run_resumes_before_it(
        train_shards, tmp_path, capsys):
    """A complete checkpoint loses bytes afterwards (an interrupted copy of the run dir, a scratch
    purge): consolidate refuses it with one line; the next start moves it aside and resumes from
    the checkpoint before it, repeating the same steps bit for bit."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", str(run), train_shards, **{**COMMON, "checkpoint__keep_last": 2})
    code, out = _run(_plain(cfg), tmp_path / "log1.txt", env=_env(LAPVQA_FAULT_KILL_IN_SAVE="0:12"))
    assert code != 0 and _complete(run) == ["global_step4", "global_step8"], out[-3000:]
    first = _rows(run)
    victim = run / "checkpoints" / "global_step8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    from lapvqa.consolidate import main as consolidate_main
    assert consolidate_main([str(run), "--out", str(tmp_path / "rel"), "--best-tag", "global_step8"]) == 2
    err = capsys.readouterr().err
    assert f"zero_pp_rank_0_mp_rank_00_optim_states.pt has {size // 2} bytes, {size} were written" in err
    code, out = _run(_plain(cfg), tmp_path / "log2.txt")
    assert code == 0, out[-3000:]
    assert "checkpoint global_step8 is damaged" in out and "resumed from global_step4" in out
    aside = run / "checkpoints" / "damaged-global_step8"
    assert (aside / "COMPLETE.damaged").exists() and not (aside / "COMPLETE").exists()
    train, val = _rows(run)
    assert [(r["step"], r["batch_hash"], r["loss"]) for r in train] == \
        [(r["step"], r["batch_hash"], r["loss"]) for r in first[0]]  # steps 5-12 again, bit-exact
    assert [v["val_loss"] for v in val] == [v["val_loss"] for v in first[1]]
    (resume,) = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines()
                 if json.loads(l)["event"] == "resume"]
    assert resume["damaged_checkpoints"] == ["global_step8"] and resume["step"] == 4
    assert consolidate_main([str(run), "--out", str(tmp_path / "rel")]) == 0  # the set-aside copy ignored


@pytest.mark.timeout(240)
def test_nonfinite_steps_in_a_row_abort(train_shards, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "run"), train_shards, train__max_steps=6,
                       debug__nan_steps=[2, 3, 4], train__max_nonfinite_in_row=3, validate__every_steps=0)
    code, out = _run(_plain(cfg), tmp_path / "log.txt")
    assert code == 3 and "3 non-finite steps in a row" in out, out[-3000:]
    assert _rows(tmp_path / "run")[0][-1]["step"] == 4


@pytest.mark.timeout(240)
def test_truncated_shard_fails_the_run_beyond_the_threshold(train_shards, tmp_path):
    import shutil
    bad = Path(shutil.copytree(train_shards, tmp_path / "bad"))
    tar = bad / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "run"), str(bad), train__max_steps=20,
                       data__max_errors=0, validate__every_steps=0, checkpoint__every_steps=100)
    code, out = _run(_plain(cfg), tmp_path / "log.txt")
    assert code == 4, out[-3000:]
    assert "more than data.max_errors=0" in out and "train-000002.tar" in out
    assert "data error #1" in out and "unexpected end of data" in out
    rows = _rows(tmp_path / "run")[0]
    assert rows[-1]["data_errors"] == 1 and all(r["data_errors"] == 0 for r in rows[:-1])
