"""FlashAttention-2-style fused attention in Triton (forward and backward).

Same contract as :func:`lapvqa.ops.attention.attention` (see that module's docstring):
q [B, H, Nq, D], k/v [B, H, Nk, D]; causal is bottom-right aligned (query i sees keys
j <= i + Nk - Nq); optional key_padding_mask [B, Nk] bool (True = keep) and/or kv_lens [B];
a query row with no visible key returns zeros and gets zero gradients.

Design (after the Triton fused-attention tutorial and FlashAttention-2):
  * forward: one program per (query block, batch*head); online softmax in the exp2 domain with
    fp32 accumulators; the key loop is split into full blocks (no masks at all) and the
    boundary blocks (causal diagonal, ragged tail of 729-long sequences, kv_lens), so the hot
    loop carries no masking work. Saves the log-sum-exp (log2 domain) for the backward.
    Fully masked rows keep m = -inf; the update uses 0 as the reference so nothing turns NaN,
    and their log-sum-exp is stored as +inf, which makes every backward probability exactly 0.
  * backward: delta = rowsum(dO * O) (preprocess), then ONE fused kernel (Triton tutorial 06
    style): program (i, b*h) computes dK/dV of key block i looping over query blocks, then dQ
    of query block i looping over key blocks. Two launches per backward, no atomics,
    deterministic. Or (a tuning candidate unless determinism is required, see BWD_CONFIGS)
    FlashAttention-2's scheme: the dK/dV loop also adds each tile's dQ share to an fp32 buffer
    with relaxed atomics, saving the dQ pass's recomputation of P and dP (5 instead of 7 tile
    matmuls, half the exp2 work).
  * launch configs are chosen by our own small tuner (first call per pow2 length bucket and
    mode) and then launched on the plain JIT kernel: per call the host does one dict lookup.
  * q/k/v/dO may be arbitrary strided views (e.g. slices of a fused qkv projection): every
    pointer is built from the four strides, nothing is copied.
  * head dims up to 128; a non-power-of-two head dim is padded inside the kernel (masked loads).
  * autograd and torch.compile: forward and backward are the custom ops
    ``torch.ops.lapvqa.flash_attn_fwd/_bwd`` (lapvqa/ops/flash_ops.py, which wraps _forward and
    _backward below), so compiled graphs hold them as opaque nodes and the host-side launch
    code and tuner always run eagerly.

Files: the ``@triton.jit`` kernels are in :mod:`lapvqa.ops.flash_kernels`; this module holds the
host side (launch configs, tuner, allocation) and the public :func:`flash_attention`.
Without triton both modules import and :data:`AVAILABLE` is False. ``TRITON_INTERPRET=1`` must be
set before the kernels are imported (triton decides at decoration time); then they run on CPU
tensors with a small fixed block config, which is what the CPU tests use.
"""

from __future__ import annotations

import math
import os

import torch

from lapvqa.ops import flash_ops  # noqa: F401  registers torch.ops.lapvqa.flash_attn_*

from lapvqa.ops import flash_kernels as kernels
from lapvqa.ops.flash_kernels import AVAILABLE, INTERPRET, triton

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------

# Forward: (BLOCK_M, BLOCK_N, num_warps, num_stages). Backward:
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages): dK/dV of BLOCK_N1 keys
# looping over BLOCK_M1 queries, then dQ of BLOCK_M2 queries looping over BLOCK_N2 keys (one
# fused kernel, deterministic). BLOCK_M2 = BLOCK_N2 = 0 selects the atomic-dQ kernel instead
# (FlashAttention-2's scheme: no dQ pass, 5 instead of 7 tile matmuls, fp32 atomics whose order
# varies between runs); tuned only while torch.are_deterministic_algorithms_enabled() is False
# and LAPVQA_ATTENTION_DETERMINISTIC is not 1, as PyTorch does for its own atomic kernels.
# Hopper (H100/H200) candidates after the Triton tutorial's sweep (its backward default is
# 32/128/128/32, 4 warps, 5 stages, which spills on sm_90 here: 8 warps do not); kept short
# because each one is a compile, and tuning runs once per process and (pow2-bucketed) shape.
FWD_CONFIGS = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4))
BWD_CONFIGS = ((32, 128, 128, 32, 8, 4), (64, 128, 128, 64, 8, 3), (32, 128, 128, 32, 8, 5),
               (32, 64, 64, 32, 4, 4),
               (32, 128, 0, 0, 8, 4), (64, 128, 0, 0, 8, 3), (64, 64, 0, 0, 4, 4))
CONFIGS = {"fwd": FWD_CONFIGS, "bwd": BWD_CONFIGS}
FIXED_CONFIG = {"fwd": FWD_CONFIGS[0], "bwd": BWD_CONFIGS[0]}
# fp32 inputs (exact "ieee" dots, for checks) spill heavily at the bf16 tiles: small fixed tiles
_FP32_CONFIG = {"fwd": (64, 32, 4, 2), "bwd": (32, 64, 64, 32, 8, 2)}
# head dims above 64 need 8 warps at these tiles to avoid spills (compile_check: D=128)
_WIDE_CONFIG = {"fwd": (128, 64, 8, 3), "bwd": (32, 64, 64, 32, 8, 2)}
# tl.dot's minimum tile; keeps the CPU interpreter fast
_INTERPRET_CONFIG = {"fwd": (16, 16, 4, 1), "bwd": (16, 16, 16, 16, 4, 1)}
INTERPRET_ATOMIC_BWD = (16, 16, 0, 0, 4, 1)  # tests force it to check the atomic-dQ kernel
_PRE_BLOCK = 64
_TUNED: dict = {}  # (stage, pow2 buckets, dtype, device, meta) -> config chosen by _tune


def autotune_enabled() -> bool:
    """LAPVQA_ATTENTION_AUTOTUNE=0 uses FIXED_CONFIG: no tuning, fast start, fixed configs."""
    return not INTERPRET and os.environ.get("LAPVQA_ATTENTION_AUTOTUNE", "1") != "0"


def deterministic() -> bool:
    """Only the deterministic (fused) backward may run: PyTorch's switch or ours."""
    return (torch.are_deterministic_algorithms_enabled()
            or os.environ.get("LAPVQA_ATTENTION_DETERMINISTIC", "0") == "1")


def atomic_dq(config) -> bool:
    return len(config) == 6 and config[2] == 0 and config[3] == 0


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _launch(stage, config, args, meta, nq, nk, bh):
    """One launch of `stage` with an explicit config: the plain JIT kernel, no autotuner wrapper
    (triton.autotune's per-call bookkeeping over ~40 args is host time on every step)."""
    if stage == "fwd":
        bm, bn, warps, stages = config
        kernels._attn_fwd[(triton.cdiv(nq, bm), bh)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                             num_warps=warps, num_stages=stages)
        return
    m1, n1, m2, n2, warps, stages = config
    if atomic_dq(config):
        dq = args[6]  # [B, H, Nq, D] in q's dtype; the kernel accumulates into fp32 first
        if nk == 0:  # no key: every dQ is 0 and there is no program to launch
            dq.zero_()
            return
        dqa = torch.zeros(dq.shape, device=dq.device, dtype=torch.float32)
        kernels._attn_bwd_atomic[(triton.cdiv(nk, n1), bh)](
            *args[:6], dqa, *args[7:], **meta, BLOCK_M1=m1, BLOCK_N1=n1,
            num_warps=warps, num_stages=stages)
        torch.mul(dqa, args[-1], out=dq)  # sm_scale (the last argument), fp32 -> q's dtype
        return
    grid = (max(triton.cdiv(nk, n1), triton.cdiv(nq, m2)), bh)
    kernels._attn_bwd[grid](*args, **meta, BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2,
                            num_warps=warps, num_stages=stages)


def _tune(stage, args, meta, nq, nk, bh):
    """Time every candidate once (short runs; outputs are just rewritten) and return the fastest.
    A candidate that does not compile or fit (shared memory) is skipped, as triton.autotune does."""
    timings, first_error = {}, None
    for cfg in _candidates(stage):
        try:
            timings[cfg] = triton.testing.do_bench(
                lambda: _launch(stage, cfg, args, meta, nq, nk, bh), warmup=5, rep=20)
        except Exception as e:  # noqa: BLE001 - OutOfResources / PTXAS errors differ by version
            first_error = first_error or e
    if not timings:
        raise RuntimeError(f"flash_attn: no {stage} config compiled: {first_error}")
    return min(timings, key=timings.get)


def _candidates(stage):
    if stage == "bwd" and deterministic():
        return tuple(c for c in CONFIGS[stage] if not atomic_dq(c))
    return CONFIGS[stage]


def _config(stage, q, nq, nk, meta, forced):
    if forced is not None:
        return forced
    if INTERPRET:
        return _INTERPRET_CONFIG[stage]
    if meta["DOT_PREC"] == "ieee":
        return _FP32_CONFIG[stage]
    if meta["HEAD_DIM"] > 64:
        return _WIDE_CONFIG[stage]
    if not autotune_enabled():
        return FIXED_CONFIG[stage]
    return None


def _run(stage, q, nq, nk, bh, args, meta, forced):
    """Launch `stage` with the forced/fixed config, else the tuned one (tuned on first use of a
    (pow2 length bucket, dtype, mode) key, then one dict lookup per call)."""
    config = _config(stage, q, nq, nk, meta, forced)
    if config is None:
        key = (stage, _bucket(nq), _bucket(nk), q.dtype, q.device.index, deterministic(),
               *meta.values())
        config = _TUNED.get(key)
        if config is None:
            config = _TUNED[key] = _tune(stage, args, meta, nq, nk, bh)
    _launch(stage, config, args, meta, nq, nk, bh)


def _meta(q, causal, kpm, kvl):
    d = q.shape[-1]
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=bool(causal),
                HAS_KPM=kpm is not None, HAS_KVLEN=kvl is not None,
                DOT_PREC=_dot_precision(q.dtype))


def _dot_precision(dtype):
    if dtype == torch.float32:
        return "ieee"  # exact fp32 products: fp32 inputs are for checks, not speed
    return "f32ops" if INTERPRET and dtype == torch.bfloat16 else "tf32"  # tf32: unused for 16-bit


def _forward(q, k, v, causal, kpm, kvl, scale, configs):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B * H, Nq), device=q.device, dtype=torch.float32)
    if B * H * Nq == 0:
        return o, lse
    kpm_t = kpm if kpm is not None else lse  # never read when HAS_KPM is False
    kvl_t = kvl if kvl is not None else lse
    args = (q, k, v, o, lse, kpm_t, kvl_t, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            kpm_t.stride(0), H, Nq, Nk, scale * _LOG2E)
    _run("fwd", q, Nq, Nk, B * H, args, _meta(q, causal, kpm, kvl), configs.get("fwd"))
    return o, lse


def _backward(do, q, k, v, o, lse, causal, kpm, kvl, scale, configs):
    """Two launches: delta = rowsum(dO * O), then the fused dK/dV + dQ kernel."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, Nk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, H, Nk, D), device=q.device, dtype=v.dtype)
    if B * H == 0 or Nq == 0 and Nk == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    meta = _meta(q, causal, kpm, kvl)
    if Nq:
        block = _INTERPRET_CONFIG["fwd"][0] if INTERPRET else _PRE_BLOCK
        kernels._attn_bwd_pre[(triton.cdiv(Nq, block), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, Nq,
            HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block)
    kpm_t = kpm if kpm is not None else lse
    kvl_t = kvl if kvl is not None else lse
    args = (q, k, v, do, lse, delta, dq, dk, dv, kpm_t, kvl_t, *q.stride(), *k.stride(),
            *v.stride(), *do.stride(), kpm_t.stride(0), H, Nq, Nk, scale * _LOG2E, scale)
    _run("bwd", q, Nq, Nk, B * H, args, meta, configs.get("bwd"))
    return dq, dk, dv


def unsupported_reason(q, k, v, key_padding_mask=None, kv_lens=None, scale=None):
    """None when the kernel can run these inputs, else a one-line reason."""
    if not AVAILABLE:
        return "triton is not installed"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected 4-d q/k/v [B, H, N, D], got {q.dim()}/{k.dim()}/{v.dim()}-d"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    if q.device != k.device or q.device != v.device:
        return "q/k/v are on different devices"
    if q.device.type != "cuda" and not INTERPRET:
        return f"{q.device.type} tensors need TRITON_INTERPRET=1 set before importing {__name__}"
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or v.shape != k.shape or k.shape[-1] != D:
        return f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        return f"key_padding_mask shape {tuple(key_padding_mask.shape)} != {(B, k.shape[2])}"
    if kv_lens is not None and tuple(kv_lens.shape) != (B,):
        return f"kv_lens shape {tuple(kv_lens.shape)} != {(B,)}"
    if scale is not None and not scale > 0:  # the kernels take the row max of unscaled scores
        return f"softmax scale {scale} is not > 0"
    return None


def flash_attention(q, k, v, *, causal=False, key_padding_mask=None, kv_lens=None, scale=None,
                    configs=None):
    """The fused kernel (same contract as lapvqa.ops.attention). `configs` optionally forces
    {"fwd": (BLOCK_M, BLOCK_N, num_warps, num_stages),
     "bwd": (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages)} (tests, benchmarks)."""
    reason = unsupported_reason(q, k, v, key_padding_mask, kv_lens, scale)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    kpm = None
    if key_padding_mask is not None:  # bytes: 1 = keep
        kpm = key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    kvl = None if kv_lens is None else kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
    configs = configs or {}
    fwd_cfg, bwd_cfg = (None if configs.get(s) is None else list(configs[s]) for s in ("fwd", "bwd"))
    # custom ops (lapvqa/ops/flash_ops.py): opaque to torch.compile, autograd registered there
    out, _lse = torch.ops.lapvqa.flash_attn_fwd(q, k, v, kpm, kvl, bool(causal), float(scale),
                                                fwd_cfg, bwd_cfg)
    return out
