"""Training-step benchmark of CaptioningModel: step time, images/s, TFLOP/s and MFU.

    python benchmarks/model.py                         # GPU: card, the variants below (~150 s)
    python benchmarks/model.py --preset tiny --small   # CPU smoke run (fp32)
    python benchmarks/model.py --variants eager:sdpa,compile:sdpa+ds+cudnn+b64

A variant is ``{eager|compile}:{sdpa|triton|auto}`` (LAPVQA_ATTENTION) plus ``+flags``:
  (none)   bf16 autocast forward, fp32 weights, fused torch AdamW (run 1's setup).
  +bf16    the module in bf16 (residual stream, norms, activations all bf16, no autocast) and an
           fp32 master copy updated by fused AdamW: DeepSpeed bf16's arithmetic without DeepSpeed.
  +ds      trainer-faithful: ``deepspeed.initialize`` with the trainer's own config
           (lapvqa.train.ds_config: ZeRO-2, bf16, grad clipping, overflow check, param groups) on
           one GPU (nccl, world size 1). Optimizer: torch's fused AdamW on the fp32 partition
           (``torch_adam``) instead of DeepSpeed's FusedAdam, whose CUDA extension would JIT-compile
           for a minute first; both are one fused pass over the fp32 states.
  +cudnn   SDPA backend priority cuDNN > flash > efficient > math (a preference with fallback;
           PyTorch's default puts flash first, cuDNN last).
  +bN      batch size N instead of --batch-size.
  +fullloss  the loss through return_logits=True: LM head + fp32 log-softmax on every position,
           padding included (the model's pre-gather loss path), for an A/B of the loss head.
"compile" = regional ``model.compile_blocks()`` (each block; identical blocks share a graph);
--compile-mode full compiles the whole model instead.

FLOPs come from ``lapvqa.pretrain.model_utils.flops_per_sample`` (model FLOPs: every matmul of
forward and backward, attention included, causal counted half; no recomputation, no optimizer;
the LM head counted on all text_len positions although the loss now runs it on real ones only:
<= 0.7% of the card's FLOPs; card at 384 px: 1.48 TFLOP per image for the encoder + ~0.06 for
the decoder at 192 tokens). MFU = achieved FLOP/s / the chip's dense bf16 peak (H100/H200 SXM:
989.4 TFLOP/s); also shown against a bf16 8192^3 matmul measured in the same run. Each variant
runs in its own process with a timeout (a hang or crash costs only that row); an out-of-memory
retries once at half the batch. The first variant is the baseline of the ratio column. Compiled
variants whose block graphs are identical (same dtype, SDPA backend and batch) reuse Inductor's
on-disk cache, so the default list orders them to share it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0}
# H200 run 1: eager:sdpa 174.8 ms (28.6% MFU), compile:auto 139.4 ms (35.8%), batch 32 (autocast).
# H200 run 2: compile:sdpa+bf16+cudnn 134.6 ms (37.1%); compile:sdpa+ds+cudnn 264.5 ms (18.9%:
# DeepSpeed adds ~130 ms per step on one GPU); a cold +b64 compile did not fit in 49 s.
GPU_VARIANTS = ("eager:sdpa,compile:sdpa+bf16+cudnn,compile:sdpa+ds+cudnn,"
                "eager:sdpa+bf16+cudnn,eager:sdpa+bf16,compile:sdpa+bf16+cudnn+b64")
FLAGS = ("bf16", "ds", "cudnn", "fullloss")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default: card on GPU, tiny on CPU)")
    p.add_argument("--small", action="store_true", help="CPU-sized run: batch 4, 32 tokens, 3 steps")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--text-len", type=int, default=None, help="padded report length (tokens)")
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--variants", default=None,
                   help="comma list of {eager|compile}:{sdpa|triton|auto}[+bf16|+ds|+cudnn|+bN|+fullloss]")
    p.add_argument("--sdpa-backend", default="default",
                   choices=["default", "flash", "cudnn", "efficient", "math"])
    p.add_argument("--compile-mode", default="regional", choices=["regional", "full"],
                   help="regional: torch.compile each transformer block (fast to compile)")
    p.add_argument("--grad-ckpt", default="0", help="encoder blocks to checkpoint (int)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    p.add_argument("--budget-s", type=float, default=150.0, help="wall-clock budget for all variants")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return _fill_defaults(args)


def _fill_defaults(a):
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = a.device.startswith("cuda")
    a.preset = a.preset or ("card" if gpu else "tiny")
    small = a.small or not gpu
    a.batch_size = a.batch_size or (4 if a.small else 8 if small else 32)
    a.text_len = a.text_len or (32 if a.small else 192)
    a.steps = a.steps or (3 if small else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if small else 3)
    a.dtype = a.dtype or ("bf16" if gpu else "fp32")
    a.variants = a.variants or (GPU_VARIANTS if gpu else "eager:sdpa")
    for v in a.variants.split(","):
        try:
            parse_variant(v)
        except ValueError as e:
            raise SystemExit(f"--variants: {e}") from None
    return a


def parse_variant(v: str) -> dict:
    """'compile:sdpa+ds+cudnn+b64' -> {mode, attn, flags (set), batch (None = --batch-size)}."""
    head, *flags = v.split("+")
    mode, _, attn = head.partition(":")
    if mode not in ("eager", "compile") or attn not in ("sdpa", "triton", "auto"):
        raise ValueError(f"{v!r} is not {{eager|compile}}:{{sdpa|triton|auto}}[+flag...]")
    out = {"mode": mode, "attn": attn, "flags": set(), "batch": None}
    for f in flags:
        if f[:1] == "b" and f[1:].isdigit() and int(f[1:]) > 0:
            out["batch"] = int(f[1:])
        elif f in FLAGS:
            out["flags"].add(f)
        else:
            raise ValueError(f"{v!r}: unknown flag +{f} (flags: {', '.join(FLAGS)}, bN)")
    if {"bf16", "ds"} <= out["flags"]:
        raise ValueError(f"{v!r}: +bf16 and +ds exclude each other (+ds is bf16 already)")
    return out


# ----------------------------------------------------------------------------- child: one variant
def make_batch(cfg, batch, text_len, device, seed=0):
    """Grayscale uint8 images (as the shards hold) and right-padded EOT-framed token rows."""
    import torch
    from lapvqa.pretrain.model import EOT
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 1, cfg.image_size, cfg.image_size), generator=g,
                           dtype=torch.uint8)
    lengths = torch.randint(text_len // 4, text_len - 1, (batch,), generator=g)
    tokens = torch.randint(0, EOT, (batch, text_len), generator=g)
    pos = torch.arange(text_len)[None]
    mask = pos < (lengths[:, None] + 2)
    tokens[:, 0] = EOT
    tokens[pos == lengths[:, None] + 1] = EOT
    tokens[~mask] = EOT
    return images.to(device), tokens.to(device), mask.to(device)


class MasterAdamW:
    """bf16 module weights + fp32 master copies stepped by AdamW: DeepSpeed bf16's arithmetic
    (bf16 forward/backward, fp32 update, weights copied back to bf16) without DeepSpeed."""

    def __init__(self, params, **adamw_kwargs):
        import torch
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, **adamw_kwargs)

    def step(self):
        import torch
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)  # fp32 -> bf16

    def zero_grad(self, set_to_none=True):
        for t in self.params + self.master:
            t.grad = None


def build_deepspeed(a, model, batch_size):
    """deepspeed.initialize with the trainer's config (ZeRO-2 bf16) on one device."""
    import socket

    import deepspeed
    import torch
    from lapvqa.config import Config
    from lapvqa.train.ds_config import deepspeed_config, param_groups
    gpu = a.device.startswith("cuda")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.precision = batch_size, "bf16"
    ds = deepspeed_config(cfg, 1, torch.device(a.device))
    # torch's fused AdamW on the fp32 partition: DeepSpeed's FusedAdam would JIT-build first
    ds["optimizer"]["params"].update(torch_adam=True, **({"fused": True} if gpu else {}))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds)
    if os.environ.get("LAPVQA_DS_STOCK_OVERFLOW_CHECK") != "1":  # as the trainer does
        from lapvqa.train.ds_patches import batch_overflow_check
        batch_overflow_check(engine.optimizer)
    return engine


def build(a, v, batch_size):
    """-> (cfg, model or DeepSpeed engine, optimizer or None)."""
    import torch
    from lapvqa.pretrain.model import CaptioningModel, get_config
    cfg = get_config(a.preset, dec_dropout=0.0, enc_grad_checkpointing=int(a.grad_ckpt))
    with torch.device(a.device):
        model = CaptioningModel(cfg).train()
    if v["mode"] == "compile":
        model = torch.compile(model) if a.compile_mode == "full" else model.compile_blocks()
    gpu = a.device.startswith("cuda")
    adamw = dict(lr=1e-4, weight_decay=0.05, **({"fused": True} if gpu else {"foreach": True}))
    if "ds" in v["flags"]:
        return cfg, build_deepspeed(a, model, batch_size), None
    if "bf16" in v["flags"]:
        model.to(torch.bfloat16)
        return cfg, model, MasterAdamW(model.parameters(), **adamw)
    return cfg, model, torch.optim.AdamW(model.parameters(), **adamw)


def timed_steps(a, v, model, opt, batch, n):
    """Run n training steps; returns per-step seconds and the last loss."""
    import torch
    gpu = a.device.startswith("cuda")
    amp = torch.autocast(device_type="cuda" if gpu else "cpu", dtype=torch.bfloat16,
                         enabled=a.dtype == "bf16" and not v["flags"] & {"bf16", "ds"})
    times, loss = [], None
    for _ in range(n):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            if "fullloss" in v["flags"]:
                loss = model(*batch, return_logits=True)[0]
            else:
                loss = model(*batch)
        if opt is None:  # DeepSpeed engine
            model.backward(loss)
            model.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, float(loss.detach())


def sdpa_context(name, cudnn_first=False):
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if cudnn_first:  # a priority order, not a restriction: shapes cuDNN cannot take fall back
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)
    if name == "default":
        return contextlib.nullcontext()
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])


def check_cudnn_attention(cfg, device) -> dict:
    """cuDNN SDPA (forced) vs fp32 math on the model's strided q/k/v views: max error relative to
    the output's / gradient's largest value, for the encoder and the causal decoder shapes."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from lapvqa.pretrain.layers import split_heads
    out = {}
    for name, n, width, heads, causal in (("enc", cfg.n_patches, cfg.enc_width, cfg.enc_heads, False),
                                          ("dec", 192, cfg.dec_width, cfg.dec_heads, True)):
        qkv = torch.randn(2, n, 3 * width, device=device, dtype=torch.bfloat16, requires_grad=True)
        ref = qkv.detach().float().requires_grad_()
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(*split_heads(qkv, 3, heads), is_causal=causal)
                g = torch.randn_like(o)
                o.backward(g)
        except RuntimeError as e:
            out[name] = "unsupported: " + str(e).splitlines()[0][:120]
            continue
        with sdpa_kernel(SDPBackend.MATH):
            o_ref = F.scaled_dot_product_attention(*split_heads(ref, 3, heads), is_causal=causal)
            o_ref.backward(g.float())
        rel = lambda x, y: float((x.float() - y).abs().max() / y.abs().max())  # noqa: E731
        out[name] = {"out": rel(o, o_ref), "grad": rel(qkv.grad, ref.grad)}
    return out


def run_variant(a, variant: str, batch_size: int) -> dict:
    import torch
    from lapvqa.pretrain.model_utils import flops_per_sample
    v = parse_variant(variant)
    os.environ["LAPVQA_ATTENTION"] = v["attn"]
    torch.manual_seed(0)
    gpu = a.device.startswith("cuda")
    extra = {}
    with sdpa_context(a.sdpa_backend, cudnn_first="cudnn" in v["flags"]):
        cfg, model, opt = build(a, v, batch_size)
        if gpu and "cudnn" in v["flags"]:
            extra["cudnn_check"] = check_cudnn_attention(cfg, a.device)
        batch = make_batch(cfg, batch_size, a.text_len, a.device)
        t0 = time.perf_counter()
        warm, _ = timed_steps(a, v, model, opt, batch, max(a.warmup, 1))
        first_s = time.perf_counter() - t0
        times, loss = timed_steps(a, v, model, opt, batch, a.steps)
    step = statistics.median(times)
    flops = flops_per_sample(cfg, a.text_len)["total"] * batch_size
    res = {"step_ms": 1e3 * step, "step_ms_mean": 1e3 * statistics.fmean(times),
           "images_per_s": batch_size / step, "tokens_per_s": float(batch[2].sum()) / step,
           "tflops_per_s": flops / step / 1e12, "warmup_s": first_s, "loss": loss,
           "flop_per_step": flops, **extra}
    if gpu:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def matmul_tflops(device) -> float | None:
    """bf16 8192^3 matmul rate on this GPU: the practical ceiling for MFU."""
    import torch
    if not device.startswith("cuda"):
        return None
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        x @ y
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3) / 1e12


def child_main(a) -> dict:
    import torch
    info = {"variant": a.child, "preset": a.preset, "device": a.device, "batch": a.batch_size,
            "text_len": a.text_len, "dtype": a.dtype, "sdpa_backend": a.sdpa_backend,
            "compile_mode": a.compile_mode if a.child.startswith("compile") else None,
            "grad_ckpt": int(a.grad_ckpt), "torch": torch.__version__}
    if a.child == "matmul":
        info["matmul_tflops"] = matmul_tflops(a.device)
        info["status"] = "ok"
        return info
    if a.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    want = parse_variant(a.child)["batch"] or a.batch_size
    info["batch"] = want
    for bs in (want, want // 2):
        try:
            info.update(run_variant(a, a.child, bs), batch=bs, status="ok")
            if bs != want:
                info["status"] = f"ok (OOM at batch {want})"
            return info
        except torch.OutOfMemoryError as e:
            info.update(status="oom", error=str(e).splitlines()[0][:200])
            import gc
            gc.collect()
            torch.cuda.empty_cache()
            if bs < 2:
                break
    return info


# ----------------------------------------------------------------------------- parent: orchestration
_RUNNING: list = []  # the child in flight, killed with us (it runs in its own process group)


def _on_term(signum, frame):
    for proc in _RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def spawn(argv, variant, timeout) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", variant]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    _RUNNING[:] = [proc]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's whole group (compile workers too)
        proc.communicate()
        return {"variant": variant, "status": f"timeout after {timeout:.0f}s"}
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = " | ".join((err or out).strip().splitlines()[-3:])[-400:]
    return {"variant": variant, "status": f"crashed rc={proc.returncode}", "error": tail}


def report(results, peak, matmul, json_out=None) -> str:
    base = next((r for r in results if r.get("status", "").startswith("ok") and "step_ms" in r), None)
    w = max([16] + [len(r["variant"]) + 1 for r in results])
    head = f"{'variant':<{w}}{'batch':>6}{'step ms':>10}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}" \
           f"{'MFU/mm':>8}{'ratio':>7}{'mem GiB':>9}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        if "step_ms" in r:
            r["mfu"] = r["tflops_per_s"] / peak if peak else None
            r["mfu_vs_matmul"] = r["tflops_per_s"] / matmul if matmul else None
            r["ratio_vs_baseline"] = r["images_per_s"] / base["images_per_s"] if base else None
            fmt = lambda v, f: ("-" if v is None else format(v, f[1:])).rjust(int(f[1]))  # noqa: E731
            lines.append(f"{r['variant']:<{w}}{r['batch']:>6}{r['step_ms']:>10.1f}"
                         f"{r['images_per_s']:>9.1f}{r['tflops_per_s']:>9.2f}{fmt(r['mfu'], '>7.1%')}"
                         f"{fmt(r['mfu_vs_matmul'], '>8.1%')}{fmt(r['ratio_vs_baseline'], '>7.2f')}"
                         f"{fmt(r.get('peak_mem_gib'), '>9.1f')}  {r['status']}")
        else:
            lines.append(f"{r['variant']:<{w}}{'':>65}  {r['status']} {r.get('error', '')}")
    text = "\n".join(lines)
    json_lines = [json.dumps(dict(r, peak_tflops=peak, matmul_tflops=matmul)) for r in results]
    if json_out:
        with open(json_out, "a") as f:
            f.write("\n".join(json_lines) + "\n")
    return text + "\n" + "\n".join("JSON " + j for j in json_lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child_main(a)), flush=True)
        return 0
    deadline = time.monotonic() + a.budget_s
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_term)  # an outer `timeout` must not leave a child on the GPU
    gpu = a.device.startswith("cuda")
    matmul = spawn(argv, "matmul", 60).get("matmul_tflops") if gpu else None
    results = []
    for variant in a.variants.split(","):
        left = deadline - time.monotonic()
        if left < 20:
            results.append({"variant": variant, "status": "skipped (budget)"})
            continue
        results.append(spawn(argv, variant, left))
        print(f"[{time.monotonic() - deadline + a.budget_s:6.1f}s] {variant}: {results[-1]['status']}",
              file=sys.stderr, flush=True)
    gpu_name = next((r.get("gpu") for r in results if r.get("gpu")), "")
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)
    print(f"{a.preset} preset, {a.device} {gpu_name}, {a.dtype}, text_len {a.text_len}, "
          f"peak {peak} TFLOP/s, matmul {matmul and round(matmul, 1)} TFLOP/s")
    print(report(results, peak, matmul, a.json_out))
    return 0 if any(r.get("status", "").startswith("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
