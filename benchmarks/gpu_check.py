"""GPU correctness check of the fused attention kernel; fails loudly (exit 1) on any mismatch.

    python benchmarks/gpu_check.py [--out benchmarks/results/attention_gpu_check.jsonl]

1. every mode (causal/cross/masks/kv_lens/fully masked rows/strided qkv views) in bf16 on odd
   lengths, plus fp32/fp16 and head dims 80/128 on a few modes, fixed launch config, against the
   float64 reference on the GPU;
2. every tuning candidate forced at the model's shapes (ViT 729, decoder causal 256) against
   SDPA math in fp32, so the autotuner can never pick a broken config (this also fills triton's
   compile cache for benchmarks/attention.py);
3. the autotuned path through the dispatcher (LAPVQA_ATTENTION=triton) at the ViT shape, and
   bitwise determinism of forward+backward with LAPVQA_ATTENTION_DETERMINISTIC=1 (the fused
   backward, no atomics; the chosen configs are printed);
4. the dispatcher's kernel inside torch.compile (inductor, fullgraph=True) against eager.
Errors are max|x - ref| / max|ref| per tensor; the bound scales with the input dtype and is also
checked against SDPA's own error in that dtype (the kernel may not be much worse than SDPA).
Run it before benchmarks/attention.py; ~35 kernel compiles, then seconds of checks (< 90 s).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lapvqa.ops import flash_attn  # noqa: E402
from lapvqa.ops.attention import sdpa_attention  # noqa: E402
from lapvqa.ops.reference import reference_attention  # noqa: E402

_TOL = {torch.float32: 1e-4, torch.float16: 6e-3, torch.bfloat16: 4e-2}


def _grads(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def _rel_errs(got, want):
    # floor 1e-2: gradients that are exactly 0 in theory (e.g. one key) have no scale of their own
    return [float((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-2))
            for g, w in zip(got, want)]


def _inputs(B, H, nq, nk, d, dtype, strided=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if strided:  # head-split views of one fused [B, N, 3, H, D] projection, as the model makes
        assert nq == nk
        q, k, v = torch.randn(B, nq, 3, H, d, device="cuda", generator=g, dtype=dtype).permute(2, 0, 3, 1, 4)
    else:
        q = torch.randn(B, H, nq, d, device="cuda", generator=g, dtype=dtype)
        k, v = (torch.randn(B, H, nk, d, device="cuda", generator=g, dtype=dtype) for _ in range(2))
    do = torch.randn(B, H, nq, d, device="cuda", generator=g, dtype=dtype)
    return q, k, v, do


def check_case(name, B, H, nq, nk, d, dtype, kw, configs=None, strided=False, ref="float64"):
    q, k, v, do = _inputs(B, H, nq, nk, d, dtype, strided)
    got = _grads(flash_attn.flash_attention, q, k, v, do, configs=configs, **kw)
    if ref == "float64":
        want = _grads(reference_attention, *(t.double() for t in (q, k, v, do)), **kw)
    else:  # SDPA math in fp32 (the big shapes: float64 would be slow and memory-hungry)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.MATH]):
            want = _grads(sdpa_attention, *(t.float() for t in (q, k, v, do)), **kw)
    # SDPA's own error in the input dtype: the kernel must not be much worse than it
    sdpa_low = _grads(sdpa_attention, q, k, v, do, **kw)
    errs, sdpa_errs = _rel_errs(got, want), _rel_errs(sdpa_low, want)
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    bound = [max(_TOL[dtype], 3.0 * s) for s in sdpa_errs]
    ok = finite and all(e <= b for e, b in zip(errs, bound))
    return dict(check=name, B=B, H=H, Nq=nq, Nk=nk, D=d, dtype=str(dtype).removeprefix("torch."),
                kw={k_: (v_ if not torch.is_tensor(v_) else "tensor") for k_, v_ in kw.items()},
                configs=configs, ref=ref, errs=dict(zip(("out", "dq", "dk", "dv"), errs)),
                sdpa_errs=dict(zip(("out", "dq", "dk", "dv"), sdpa_errs)), finite=finite, ok=ok)


def mode_sweep():
    """(name, args, kwargs) for part 1: odd lengths across block boundaries, every mode."""
    dev = "cuda"
    kpm = torch.rand(2, 200, device=dev, generator=torch.Generator(device=dev).manual_seed(3)) > 0.3
    kpm[1] = False  # batch 1: every key masked -> zeros, zero grads
    modes = {
        "self_729": (2, 3, 729, 729, {}),
        "self_1": (2, 3, 1, 1, {}),
        "cross_77x200": (2, 3, 77, 200, {}),
        "cross_200x77": (2, 3, 200, 77, {}),
        "causal_200": (2, 3, 200, 200, {"causal": True}),
        "causal_77x200": (2, 3, 77, 200, {"causal": True}),
        "causal_200x77": (2, 3, 200, 77, {"causal": True}),
        "kpm_77x200_fully_masked": (2, 3, 77, 200, {"key_padding_mask": kpm}),
        "kv_lens_causal": (2, 3, 200, 200, {"causal": True, "kv_lens": torch.tensor([0, 131], device=dev)}),
    }
    # Every mode in bf16; the other dtypes and head dims on a few modes only: each new
    # (dtype, head dim, mode flags) combination is two compiles, and the whole GPU run is ~5 min.
    extra = {"causal_77x200": (torch.float32,), "kpm_77x200_fully_masked": (torch.float32,),
             "kv_lens_causal": (torch.float16,)}
    for name, (B, H, nq, nk, kw) in modes.items():
        for dtype in (torch.bfloat16, *extra.get(name, ())):
            yield f"{name}/{str(dtype)[6:]}", (B, H, nq, nk, 64, dtype, kw), {}
    for d in (80, 128):  # padded (non-power-of-two) head dim; the wide-head config
        yield f"causal_200/d{d}", (2, 3, 200, 200, d, torch.bfloat16, {"causal": True}), {}
    yield "strided_qkv_causal", (2, 3, 200, 200, 64, torch.bfloat16, {"causal": True}), {"strided": True}
    # the atomic-dQ backward's own key-mask path (padding keys must add nothing to dQ)
    atomic = {"bwd": next(c for c in flash_attn.BWD_CONFIGS if flash_attn.atomic_dq(c))}
    for name in ("kpm_77x200_fully_masked", "kv_lens_causal", "causal_77x200"):
        B, H, nq, nk, kw = modes[name]
        yield f"{name}/atomic_dq", (B, H, nq, nk, 64, torch.bfloat16, kw), {"configs": atomic}


def config_sweep():
    """Part 2: every autotune config of every stage at the model's shapes vs fp32 SDPA math."""
    stages = flash_attn.CONFIGS
    n = max(len(c) for c in stages.values())
    for i in range(n):
        cfg = {s: c[min(i, len(c) - 1)] for s, c in stages.items()}
        yield f"vit_729/config{i}", (8, 16, 729, 729, 64, torch.bfloat16, {}), {"configs": cfg, "ref": "fp32"}
        yield f"decoder_causal_256/config{i}", (8, 8, 256, 256, 64, torch.bfloat16, {"causal": True}), \
            {"configs": cfg, "ref": "fp32"}


def autotuned_checks(emit):
    """Part 3: the dispatcher's autotuned path at the ViT shape, and determinism."""
    os.environ["LAPVQA_ATTENTION_AUTOTUNE"] = "1"
    os.environ["LAPVQA_ATTENTION"] = "triton"
    dispatch = importlib.import_module("lapvqa.ops.attention")
    rec = check_case("vit_729/autotuned_via_dispatcher", 32, 16, 729, 729, 64, torch.bfloat16, {},
                     ref="fp32")
    emit(rec)
    q, k, v, do = _inputs(4, 16, 729, 729, 64, torch.bfloat16, strided=True)
    # the atomic-dQ backward may win the tuning: determinism is what the switch promises
    os.environ["LAPVQA_ATTENTION_DETERMINISTIC"] = "1"
    try:
        runs = [_grads(dispatch.attention, q, k, v, do) for _ in range(2)]
    finally:
        del os.environ["LAPVQA_ATTENTION_DETERMINISTIC"]
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    emit(dict(check="deterministic_fwd_bwd (LAPVQA_ATTENTION_DETERMINISTIC=1)", ok=same,
              tuned={str(k_[:3]): v_ for k_, v_ in flash_attn._TUNED.items()}))


def compiled_check(emit):
    """Part 4: the kernel inside torch.compile (inductor, fullgraph: no graph break) matches eager.
    The ops are opaque custom ops, so compiled and eager run the same launches: errors ~0."""
    os.environ["LAPVQA_ATTENTION"] = "triton"
    dispatch = importlib.import_module("lapvqa.ops.attention")

    def block(q, k, v):
        return dispatch.attention(q * 1.5, k, v, causal=True) * 2

    q, k, v, do = _inputs(4, 8, 256, 256, 64, torch.bfloat16, strided=True)
    want = _grads(block, q, k, v, do)
    got = _grads(torch.compile(block, fullgraph=True), q, k, v, do)
    errs = _rel_errs(got, want)
    emit(dict(check="torch_compile_inductor_fullgraph", ok=max(errs) < 1e-2,
              errs=dict(zip(("out", "dq", "dk", "dv"), errs))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON lines file (appended)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not flash_attn.AVAILABLE:
        print("gpu_check: needs a CUDA device and triton")
        return 2
    os.environ["LAPVQA_ATTENTION_AUTOTUNE"] = "0"  # part 1: fixed configs, few compiles
    out = open(args.out, "a") if args.out else None
    failed, start = [], time.time()

    def emit(rec):
        rec["device"] = torch.cuda.get_device_name()
        if not rec.get("ok"):
            failed.append(rec["check"])
        errs = rec.get("errs")
        print(("PASS " if rec.get("ok") else "FAIL ") + rec["check"]
              + (" err " + " ".join(f"{k}={e:.1e}" for k, e in errs.items()) if errs else "")
              + (f" [{rec['error']}]" if rec.get("error") else ""), flush=True)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    for name, a, kw in (*mode_sweep(), *config_sweep()):
        try:
            emit(check_case(name, *a, **kw))
        except Exception as e:  # noqa: BLE001 - report and continue: one run must show everything
            emit(dict(check=name, ok=False, error=f"{type(e).__name__}: {e}"[:300]))
            traceback.print_exc(limit=3)
    try:
        autotuned_checks(emit)
    except Exception as e:  # noqa: BLE001
        emit(dict(check="autotuned", ok=False, error=f"{type(e).__name__}: {e}"[:300]))
        traceback.print_exc(limit=3)
    try:
        compiled_check(emit)
    except Exception as e:  # noqa: BLE001
        emit(dict(check="torch_compile_inductor_fullgraph", ok=False,
                  error=f"{type(e).__name__}: {e}"[:300]))
        traceback.print_exc(limit=3)
    status = "FAIL" if failed else "PASS"
    print(f"GPU_CHECK {status}: {len(failed)} failed {failed} in {time.time() - start:.0f}s", flush=True)
    if out:
        out.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
