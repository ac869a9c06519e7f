"""Fused Triton attention vs every SDPA backend at the model's shapes (forward, forward+backward).

    python benchmarks/attention.py --out benchmarks/results/attention_h200.jsonl   # GPU
    python benchmarks/attention.py --cpu-smoke                                   # CPU, interpreter

Per case and backend: median ms (triton.testing.do_bench), TFLOP/s and the ratio against the
best SDPA backend measured in the same run. FLOPs: forward 4*B*H*D*(visible query-key pairs)
(two matmuls; causal counts only the visible half), forward+backward 3.5x that (the backward
recomputes QK^T and adds four more matmuls, 2.5x the forward). A backend that cannot run a case
is reported n/a with its reason; every case is isolated, nothing aborts the run. Ends by printing
the AutoRule lines for lapvqa.ops.attention.AUTO_KERNEL_RULES (cases where the kernel won).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

if "--cpu-smoke" in sys.argv:  # must precede the kernel's import: triton reads it at decoration
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lapvqa.ops import flash_attn  # noqa: E402
from lapvqa.ops.attention import sdpa_attention  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    H: int
    Nq: int
    Nk: int
    D: int = 64
    causal: bool = False
    pad: int = 0  # right-padded keys per sequence of batch half (key_padding_mask), 0 = none


GPU_CASES = (
    Case("vit_l384_self_729", 32, 16, 729, 729),
    Case("vit_l384_self_730", 32, 16, 730, 730),
    Case("decoder_causal_256", 32, 8, 256, 256, causal=True),
    Case("decoder_causal_512", 32, 8, 512, 512, causal=True),
    Case("decoder_cross_256x256", 32, 8, 256, 256),
    Case("decoder_causal_256_padded", 32, 8, 256, 256, causal=True, pad=64),
)
CPU_CASES = (
    Case("smoke_self_33", 1, 2, 33, 33, D=32),
    Case("smoke_causal_40", 1, 2, 40, 40, D=32, causal=True),
    Case("smoke_cross_17x33_padded", 1, 2, 17, 33, D=32, pad=5),
)
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def visible_pairs(c: Case) -> int:
    if not c.causal:
        return c.Nq * c.Nk
    return sum(min(c.Nk, max(0, i + c.Nk - c.Nq + 1)) for i in range(c.Nq))


def flops(c: Case, mode: str) -> float:
    fwd = 4.0 * c.B * c.H * c.D * visible_pairs(c)
    return fwd if mode == "fwd" else 3.5 * fwd


def _make_inputs(c: Case, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(c.B, c.H, c.Nq, c.D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(c.B, c.H, c.Nk, c.D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(c.B, c.H, c.Nk, c.D, generator=g).to(device, dtype).requires_grad_()
    do = torch.randn(c.B, c.H, c.Nq, c.D, generator=g).to(device, dtype)
    kpm = None
    if c.pad:
        kpm = torch.ones(c.B, c.Nk, dtype=torch.bool, device=device)
        kpm[: c.B // 2 or 1, c.Nk - c.pad:] = False
    return q, k, v, do, kpm


def _backend_fn(name: str, c: Case, kpm):
    if name.startswith("triton"):
        # triton: the tuner may pick the atomic-dQ backward; triton_det: the deterministic one
        det = "1" if name == "triton_det" else "0"

        def kernel(q, k, v):
            # read when the backward runs (in autograd.grad, after this returns): left set
            os.environ["LAPVQA_ATTENTION_DETERMINISTIC"] = det
            return flash_attn.flash_attention(q, k, v, causal=c.causal, key_padding_mask=kpm)
        return kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return sdpa_attention(q, k, v, causal=c.causal, key_padding_mask=kpm)
    return run


def _timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50))

    def cpu(fn, reps=3):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) * 1e3 / reps
    return cpu


def bench_case(c: Case, backends, device, dtype, emit):
    """Time every backend on one case; reference output = the math backend (or first that ran)."""
    q, k, v, do, kpm = _make_inputs(c, device, dtype)
    timer = _timer(device)
    rows, outs = [], {}
    for name in backends:
        fn = _backend_fn(name, c, kpm)
        row = dict(case=c.name, backend=name, **asdict(c), dtype=str(dtype).removeprefix("torch."))
        try:
            outs[name] = fn(q, k, v).detach().float()
            fwd = lambda: fn(q, k, v)  # noqa: E731
            fwd_bwd = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
            for mode, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                ms = timer(f)
                rows.append(dict(row, mode=mode, ms=ms, tflops=flops(c, mode) / ms / 1e9))
        except Exception as e:  # noqa: BLE001 - a backend that cannot run this case is n/a
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:100] if str(e).strip() else ''}"
            rows.extend(dict(row, mode=m, ms=None, tflops=None, error=msg) for m in ("fwd", "fwd_bwd"))
        if device.type == "cuda":
            torch.cuda.synchronize()
    for mode in ("fwd", "fwd_bwd"):
        sdpa_ms = [r["ms"] for r in rows
                   if r["mode"] == mode and not r["backend"].startswith("triton") and r["ms"]]
        best = min(sdpa_ms) if sdpa_ms else None
        for r in rows:
            if r["mode"] == mode:
                r["best_sdpa_ms"] = best
                r["speedup_vs_best_sdpa"] = best / r["ms"] if best and r["ms"] else None
    # accuracy reference: the math backend, else the first SDPA backend that ran
    ref = outs.get("math", next((o for n, o in outs.items() if not n.startswith("triton")), None))
    for r in rows:
        out = outs.get(r["backend"])
        if out is not None and ref is not None:
            r["max_abs_err_vs_ref"] = float((out - ref).abs().max())
        emit(r)
    return rows


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def print_row(r):
    print(f"{r['case']:<28} {r['mode']:<8} {r['backend']:<10} {_fmt(r['ms'], '9.3f')} ms "
          f"{_fmt(r['tflops'], '7.1f')} TFLOP/s  x{_fmt(r.get('speedup_vs_best_sdpa'), '.2f')}"
          f"  err {_fmt(r.get('max_abs_err_vs_ref'), '.1e')}"
          + (f"  [{r['error']}]" if r.get("error") else ""), flush=True)


def _bucket_range(n: int) -> tuple[int, int]:
    hi = 1 << max(n - 1, 0).bit_length()
    return hi // 2 + 1, hi


def suggested_rules(rows) -> list[str]:
    """AutoRule source lines for the cases where the kernel beat the best SDPA backend."""
    rules = []
    for r in rows:
        if r["backend"] != "triton" or not r.get("speedup_vs_best_sdpa"):
            continue
        if r["speedup_vs_best_sdpa"] < 1.0:
            continue
        line = (f"AutoRule(causal={r['causal']}, masked={bool(r['pad'])}, head_dims=({r['D']},), "
                f"nq={_bucket_range(r['Nq'])}, nk={_bucket_range(r['Nk'])}, "
                f"training={r['mode'] == 'fwd_bwd'}),  # {r['case']} x{r['speedup_vs_best_sdpa']:.2f}")
        if line not in rules:
            rules.append(line)
    return rules


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON lines file (appended)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, Triton interpreter")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--time-budget", type=float, default=150.0,
                    help="seconds; cases not started by then are reported as skipped")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device, dtype, cases = torch.device("cpu"), torch.float32, CPU_CASES
    elif not torch.cuda.is_available():
        print("benchmarks/attention.py: no CUDA device (use --cpu-smoke on CPU)")
        return 2
    else:
        device, dtype, cases = torch.device("cuda"), getattr(torch, args.dtype), GPU_CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = tuple(c for c in cases if c.name in wanted)
    backends = (("triton", "triton_det") if flash_attn.AVAILABLE else ()) + SDPA_BACKENDS
    out = open(args.out, "a") if args.out else None
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, autotune=flash_attn.autotune_enabled())

    def emit(r):
        r = dict(r, **env)
        print_row(r)
        if out:
            out.write(json.dumps(r) + "\n")
            out.flush()

    start, all_rows = time.time(), []
    for c in cases:
        if time.time() - start > args.time_budget:
            emit(dict(case=c.name, backend="*", mode="*", ms=None, tflops=None, **asdict(c),
                      error=f"skipped: --time-budget {args.time_budget:.0f}s spent"))
            continue
        t0 = time.time()
        all_rows += bench_case(c, backends, device, dtype, emit)
        print(f"# {c.name}: {time.time() - t0:.1f}s (incl. autotuning)", flush=True)
        if flash_attn.AVAILABLE:  # which launch configs the tuner chose (atomic dQ: BLOCK_M2 = 0)
            print(f"# tuned so far: {sorted((str(k[:3]), k[5], v) for k, v in flash_attn._TUNED.items())}",
                  flush=True)
    print("# suggested AUTO_KERNEL_RULES (lapvqa/ops/attention.py):")
    for line in suggested_rules(all_rows) or ["# (none: the kernel did not win any case)"]:
        print("    " + line)
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
