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
    deterministic.
  * launch configs are chosen by our own small tuner (first call per pow2 length bucket and
    mode) and then launched on the plain JIT kernel: per call the host does one dict lookup.
  * q/k/v/dO may be arbitrary strided views (e.g. slices of a fused qkv projection): every
    pointer is built from the four strides, nothing is copied.
  * head dims up to 128; a non-power-of-two head dim is padded inside the kernel (masked loads).
  * autograd and torch.compile: forward and backward are the custom ops
    ``torch.ops.lapvqa.flash_attn_fwd/_bwd`` (lapvqa/ops/flash_ops.py, which wraps _forward and
    _backward below), so compiled graphs hold them as opaque nodes and the host-side launch
    code and tuner always run eagerly.

Triton is imported lazily-guarded: without triton (or without CUDA and TRITON_INTERPRET=1) the
module still imports and :data:`AVAILABLE` is False. ``TRITON_INTERPRET=1`` must be set before
this module is imported (triton decides at decoration time); then the kernels run on CPU
tensors with a small fixed block config, which is what the CPU tests use.
"""

from __future__ import annotations

import math
import os

import torch

from lapvqa.ops import flash_ops  # noqa: F401  registers torch.ops.lapvqa.flash_attn_*

try:  # the package must import without triton (CPU-only installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test
    triton = None
    tl = None

AVAILABLE = triton is not None
INTERPRET = AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
# runtime ints that must not multiply compiles (729 vs 730, 8 vs 16 heads, tuning buckets)
_SEQ_ARGS = ("H", "Nq", "Nk")


if AVAILABLE:

    @triton.jit
    def _mm(a, b, DOT_PREC: tl.constexpr):
        # "f32ops": the interpreter's bf16 tl.dot is wrong (triton 3.8), so under
        # TRITON_INTERPRET=1 bf16 operands are widened exactly to fp32 first; never on a GPU.
        if DOT_PREC == "f32ops":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=DOT_PREC)

    @triton.jit
    def _mma(a, b, acc, DOT_PREC: tl.constexpr):
        if DOT_PREC == "f32ops":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=DOT_PREC)

    @triton.jit
    def _load_rows(base, offs_r, offs_d, stride_r, stride_d, n_rows,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_MASK: tl.constexpr):
        """[len(offs_r), BLOCK_D] tile; rows >= n_rows (if ROW_MASK) and padded dims read 0."""
        ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
        if ROW_MASK:
            if BLOCK_D != HEAD_DIM:
                t = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            else:
                t = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            if BLOCK_D != HEAD_DIM:
                t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            else:
                t = tl.load(ptrs)
        return t

    @triton.jit
    def _store_rows(base, val, offs_r, offs_d, stride_r, stride_d, n_rows,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
        if BLOCK_D != HEAD_DIM:
            tl.store(ptrs, val, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))
        else:
            tl.store(ptrs, val, mask=offs_r[:, None] < n_rows)

    @triton.jit
    def _visible(offs_m, offs_n, n_valid, diag, kpm_base, Nk,
                 CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
        """[BLOCK_M, BLOCK_N] bool: key in range/length, allowed by the padding mask and causality."""
        vis = (offs_n < n_valid)[None, :] & (offs_m >= 0)[:, None]
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n, mask=offs_n < Nk, other=0)
            vis = vis & (keep != 0)[None, :]
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + diag)
        return vis

    @triton.jit
    def _key_bounds(start_m, Nq, Nk, kvl_ptr, off_b,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr):
        """(n_valid, full_end, hi) for a query block: keys [0, full_end) need no mask at all,
        [full_end, hi) are boundary blocks, keys >= hi are invisible to every row of the block."""
        n_valid = Nk
        if HAS_KVLEN:
            n_valid = tl.minimum(tl.maximum(tl.load(kvl_ptr + off_b).to(tl.int32), 0), Nk)
        hi = n_valid
        full_end = (n_valid // BLOCK_N) * BLOCK_N
        if CAUSAL:
            diag = Nk - Nq
            hi = tl.minimum(hi, tl.maximum((start_m + 1) * BLOCK_M + diag, 0))
            # the block's first row sees keys <= start_m*BLOCK_M + diag: blocks below are full
            first = tl.maximum(start_m * BLOCK_M + diag + 1, 0)
            full_end = tl.minimum(full_end, (first // BLOCK_N) * BLOCK_N)
        full_end = tl.minimum(full_end, hi)
        return n_valid, full_end, hi

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base,
                   stride_kn, stride_kd, stride_vn, stride_vd,
                   offs_m, offs_d, lo, hi, n_valid, diag, Nk, qk_scale,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                   DOT_PREC: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, Nk, HEAD_DIM, BLOCK_D, MASKED)
            qk = _mm(q, tl.trans(k), DOT_PREC) * qk_scale
            if MASKED or HAS_KPM:
                vis = _visible(offs_m, offs_n, n_valid, diag, kpm_base, Nk, CAUSAL and MASKED, HAS_KPM)
                qk = tl.where(vis, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: no NaN
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_ref = m_new
            p = tl.math.exp2(qk - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, Nk, HEAD_DIM, BLOCK_D, MASKED)
            acc = _mma(p.to(v.dtype), v, acc, DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=_SEQ_ARGS)
    def _attn_fwd(Q, K, V, O, LSE, KPM, KVL,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  sob, soh, som, sod, skpm_b,
                  H, Nq, Nk, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
                  DOT_PREC: tl.constexpr):
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = off_bh // H
        off_h = off_bh % H
        q_base = Q + off_b.to(tl.int64) * sqb + off_h.to(tl.int64) * sqh
        k_base = K + off_b.to(tl.int64) * skb + off_h.to(tl.int64) * skh
        v_base = V + off_b.to(tl.int64) * svb + off_h.to(tl.int64) * svh
        o_base = O + off_b.to(tl.int64) * sob + off_h.to(tl.int64) * soh
        kpm_base = KPM + off_b.to(tl.int64) * skpm_b
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)

        q = _load_rows(q_base, offs_m, offs_d, sqm, sqd, Nq, HEAD_DIM, BLOCK_D, True)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_valid, full_end, hi = _key_bounds(start_m, Nq, Nk, KVL, off_b, BLOCK_M, BLOCK_N, CAUSAL, HAS_KVLEN)
        diag = Nk - Nq
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, skn, skd, svn, svd,
                                   offs_m, offs_d, 0, full_end, n_valid, diag, Nk, qk_scale,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, HAS_KPM, DOT_PREC)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, skn, skd, svn, svd,
                                   offs_m, offs_d, full_end, hi, n_valid, diag, Nk, qk_scale,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, HAS_KPM, DOT_PREC)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
        tl.store(LSE + off_bh.to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)
        _store_rows(o_base, out.to(O.dtype.element_ty), offs_m, offs_d, som, sod, Nq, HEAD_DIM, BLOCK_D)

    @triton.jit(do_not_specialize=("H", "Nq"))
    def _attn_bwd_pre(O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, Nq,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = off_bh // H
        off_h = off_bh % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        o = _load_rows(O + off_b.to(tl.int64) * sob + off_h.to(tl.int64) * soh,
                       offs_m, offs_d, som, sod, Nq, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(DO + off_b.to(tl.int64) * sdob + off_h.to(tl.int64) * sdoh,
                        offs_m, offs_d, sdom, sdod, Nq, HEAD_DIM, BLOCK_D, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + off_bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                    sqm, sqd, sdom, sdod, offs_n, offs_d, lo, hi, Nq, diag, qk_scale,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, offs_m, offs_d, sqm, sqd, Nq, HEAD_DIM, BLOCK_D, True)
            do = _load_rows(do_base, offs_m, offs_d, sdom, sdod, Nq, HEAD_DIM, BLOCK_D, True)
            # rows past Nq read lse=+inf, so their probabilities are exactly 0
            lse = tl.load(lse_base + offs_m, mask=offs_m < Nq, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Nq, other=0.0)
            qkT = _mm(k, tl.trans(q), DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
            pT = tl.math.exp2(qkT - lse[None, :])
            if MASKED:  # causal diagonal blocks
                pT = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pT, 0.0)
            dv = _mma(pT.to(do.dtype), do, dv, DOT_PREC)
            dpT = _mm(v, tl.trans(do), DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk = _mma(dsT.to(q.dtype), q, dk, DOT_PREC)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, KVL,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sdob, sdoh, sdom, sdod, skpm_b, off_b, off_h, off_bh, start_n,
                        Nq, Nk, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
                        DOT_PREC: tl.constexpr):
        """dK, dV of keys [start_n, start_n + BLOCK_N): loop over the query blocks that see them."""
        q_base = Q + off_b.to(tl.int64) * sqb + off_h.to(tl.int64) * sqh
        do_base = DO + off_b.to(tl.int64) * sdob + off_h.to(tl.int64) * sdoh
        lse_base = LSE + off_bh.to(tl.int64) * Nq
        delta_base = DELTA + off_bh.to(tl.int64) * Nq
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_rows(K + off_b.to(tl.int64) * skb + off_h.to(tl.int64) * skh,
                       offs_n, offs_d, skn, skd, Nk, HEAD_DIM, BLOCK_D, True)
        v = _load_rows(V + off_b.to(tl.int64) * svb + off_h.to(tl.int64) * svh,
                       offs_n, offs_d, svn, svd, Nk, HEAD_DIM, BLOCK_D, True)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        n_valid = Nk
        if HAS_KVLEN:
            n_valid = tl.minimum(tl.maximum(tl.load(KVL + off_b).to(tl.int32), 0), Nk)
        hi = tl.where(start_n < n_valid, Nq, 0)  # a block of padding keys gets no gradient
        full_lo = 0
        diag = Nk - Nq
        if CAUSAL:
            # query i sees key j iff j <= i + diag: rows < start_n - diag see nothing of this block,
            # rows >= start_n + BLOCK_N - 1 - diag see all of it
            lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
            full_lo = tl.minimum(full_lo, hi)
            lo = tl.minimum(lo, full_lo)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 sqm, sqd, sdom, sdod, offs_n, offs_d, lo, full_lo, Nq, diag, qk_scale,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, True, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             sqm, sqd, sdom, sdod, offs_n, offs_d, full_lo, hi, Nq, diag, qk_scale,
                             BLOCK_M, HEAD_DIM, BLOCK_D, False, DOT_PREC)
        # A masked key never contributed, so its dk/dv rows are zero; other keys are unaffected
        # (their probabilities use the saved lse), so masking once here is exact.
        keep = offs_n < n_valid
        if HAS_KPM:
            keep = keep & (tl.load(KPM + off_b.to(tl.int64) * skpm_b + offs_n, mask=offs_n < Nk, other=0) != 0)
        dk = tl.where(keep[:, None], dk * sm_scale, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
        # DK/DV are allocated contiguous like K's [B, H, Nk, D] view
        dkdv_off = off_bh.to(tl.int64) * Nk * HEAD_DIM
        _store_rows(DK + dkdv_off, dk.to(DK.dtype.element_ty), offs_n, offs_d, HEAD_DIM, 1, Nk, HEAD_DIM, BLOCK_D)
        _store_rows(DV + dkdv_off, dv.to(DV.dtype.element_ty), offs_n, offs_d, HEAD_DIM, 1, Nk, HEAD_DIM, BLOCK_D)

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, skn, skd, svn, svd,
                  offs_m, offs_d, lo, hi, n_valid, diag, Nk, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                  DOT_PREC: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, offs_n, offs_d, skn, skd, Nk, HEAD_DIM, BLOCK_D, MASKED)
            v = _load_rows(v_base, offs_n, offs_d, svn, svd, Nk, HEAD_DIM, BLOCK_D, MASKED)
            qk = _mm(q, tl.trans(k), DOT_PREC) * qk_scale
            p = tl.math.exp2(qk - lse[:, None])
            if MASKED or HAS_KPM:
                vis = _visible(offs_m, offs_n, n_valid, diag, kpm_base, Nk, CAUSAL and MASKED, HAS_KPM)
                p = tl.where(vis, p, 0.0)
            dp = _mm(do, tl.trans(v), DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = _mma(ds.to(k.dtype), k, dq, DOT_PREC)
        return dq

    @triton.jit
    def _bwd_dq_block(Q, K, V, DO, LSE, DELTA, DQ, KPM, KVL,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      sdob, sdoh, sdom, sdod, skpm_b, off_b, off_h, off_bh, start_m,
                      Nq, Nk, qk_scale, sm_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
                      DOT_PREC: tl.constexpr):
        """dQ of query block start_m: loop over the key blocks it sees."""
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + off_b.to(tl.int64) * sqb + off_h.to(tl.int64) * sqh,
                       offs_m, offs_d, sqm, sqd, Nq, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(DO + off_b.to(tl.int64) * sdob + off_h.to(tl.int64) * sdoh,
                        offs_m, offs_d, sdom, sdod, Nq, HEAD_DIM, BLOCK_D, True)
        lse = tl.load(LSE + off_bh.to(tl.int64) * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
        delta = tl.load(DELTA + off_bh.to(tl.int64) * Nq + offs_m, mask=offs_m < Nq, other=0.0)
        k_base = K + off_b.to(tl.int64) * skb + off_h.to(tl.int64) * skh
        v_base = V + off_b.to(tl.int64) * svb + off_h.to(tl.int64) * svh
        kpm_base = KPM + off_b.to(tl.int64) * skpm_b
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_valid, full_end, hi = _key_bounds(start_m, Nq, Nk, KVL, off_b, BLOCK_M, BLOCK_N, CAUSAL, HAS_KVLEN)
        diag = Nk - Nq
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, skn, skd, svn, svd,
                       offs_m, offs_d, 0, full_end, n_valid, diag, Nk, qk_scale,
                       BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, HAS_KPM, DOT_PREC)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, skn, skd, svn, svd,
                       offs_m, offs_d, full_end, hi, n_valid, diag, Nk, qk_scale,
                       BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, HAS_KPM, DOT_PREC)
        dq = dq * sm_scale
        dq_off = off_bh.to(tl.int64) * Nq * HEAD_DIM
        _store_rows(DQ + dq_off, dq.to(DQ.dtype.element_ty), offs_m, offs_d, HEAD_DIM, 1, Nq, HEAD_DIM, BLOCK_D)

    @triton.jit(do_not_specialize=_SEQ_ARGS)
    def _attn_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, KPM, KVL,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  sdob, sdoh, sdom, sdod, skpm_b,
                  H, Nq, Nk, qk_scale, sm_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                  BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
                  DOT_PREC: tl.constexpr):
        # One launch for the whole backward (after the delta preprocess), as in the Triton
        # tutorial's fused backward: program i computes dK/dV of key block i, then dQ of query
        # block i. No atomics (each output tile has one writer), deterministic.
        pid = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = off_bh // H
        off_h = off_bh % H
        if pid * BLOCK_N1 < Nk:
            _bwd_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, KVL,
                            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                            sdob, sdoh, sdom, sdod, skpm_b, off_b, off_h, off_bh, pid * BLOCK_N1,
                            Nq, Nk, qk_scale, sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M1, BLOCK_N1,
                            CAUSAL, HAS_KPM, HAS_KVLEN, DOT_PREC)
        if pid * BLOCK_M2 < Nq:
            _bwd_dq_block(Q, K, V, DO, LSE, DELTA, DQ, KPM, KVL,
                          sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                          sdob, sdoh, sdom, sdod, skpm_b, off_b, off_h, off_bh, pid,
                          Nq, Nk, qk_scale, sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M2, BLOCK_N2,
                          CAUSAL, HAS_KPM, HAS_KVLEN, DOT_PREC)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------

# Forward: (BLOCK_M, BLOCK_N, num_warps, num_stages). Backward (one fused kernel):
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages): dK/dV of BLOCK_N1 keys
# looping over BLOCK_M1 queries, then dQ of BLOCK_M2 queries looping over BLOCK_N2 keys.
# Hopper (H100/H200) candidates after the Triton tutorial's sweep (its backward default is
# 32/128/128/32, 4 warps, 5 stages, which spills on sm_90 here: 8 warps do not); kept short because each one is a compile, and tuning runs
# once per process and (pow2-bucketed) shape.
FWD_CONFIGS = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4))
BWD_CONFIGS = ((32, 128, 128, 32, 8, 4), (64, 128, 128, 64, 8, 3), (32, 128, 128, 32, 8, 5),
               (32, 64, 64, 32, 4, 4))
CONFIGS = {"fwd": FWD_CONFIGS, "bwd": BWD_CONFIGS}
FIXED_CONFIG = {"fwd": FWD_CONFIGS[0], "bwd": BWD_CONFIGS[0]}
# fp32 inputs (exact "ieee" dots, for checks) spill heavily at the bf16 tiles: small fixed tiles
_FP32_CONFIG = {"fwd": (64, 32, 4, 2), "bwd": (32, 64, 64, 32, 8, 2)}
# head dims above 64 need 8 warps at these tiles to avoid spills (compile_check: D=128)
_WIDE_CONFIG = {"fwd": (128, 64, 8, 3), "bwd": (32, 64, 64, 32, 8, 2)}
# tl.dot's minimum tile; keeps the CPU interpreter fast
_INTERPRET_CONFIG = {"fwd": (16, 16, 4, 1), "bwd": (16, 16, 16, 16, 4, 1)}
_PRE_BLOCK = 64
_TUNED: dict = {}  # (stage, pow2 buckets, dtype, device, meta) -> config chosen by _tune


def autotune_enabled() -> bool:
    """LAPVQA_ATTENTION_AUTOTUNE=0 uses FIXED_CONFIG: no tuning, fast start, fixed configs."""
    return not INTERPRET and os.environ.get("LAPVQA_ATTENTION_AUTOTUNE", "1") != "0"


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _launch(stage, config, args, meta, nq, nk, bh):
    """One launch of `stage` with an explicit config: the plain JIT kernel, no autotuner wrapper
    (triton.autotune's per-call bookkeeping over ~40 args is host time on every step)."""
    if stage == "fwd":
        bm, bn, warps, stages = config
        _attn_fwd[(triton.cdiv(nq, bm), bh)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                             num_warps=warps, num_stages=stages)
        return
    m1, n1, m2, n2, warps, stages = config
    grid = (max(triton.cdiv(nk, n1), triton.cdiv(nq, m2)), bh)
    _attn_bwd[grid](*args, **meta, BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2,
                    num_warps=warps, num_stages=stages)


def _tune(stage, args, meta, nq, nk, bh):
    """Time every candidate once (short runs; outputs are just rewritten) and return the fastest.
    A candidate that does not compile or fit (shared memory) is skipped, as triton.autotune does."""
    timings, first_error = {}, None
    for cfg in CONFIGS[stage]:
        try:
            timings[cfg] = triton.testing.do_bench(
                lambda: _launch(stage, cfg, args, meta, nq, nk, bh), warmup=5, rep=20)
        except Exception as e:  # noqa: BLE001 - OutOfResources / PTXAS errors differ by version
            first_error = first_error or e
    if not timings:
        raise RuntimeError(f"flash_attn: no {stage} config compiled: {first_error}")
    return min(timings, key=timings.get)


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
        key = (stage, _bucket(nq), _bucket(nk), q.dtype, q.device.index, *meta.values())
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
        _attn_bwd_pre[(triton.cdiv(Nq, block), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, Nq,
            HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block)
    kpm_t = kpm if kpm is not None else lse
    kvl_t = kvl if kvl is not None else lse
    args = (q, k, v, do, lse, delta, dq, dk, dv, kpm_t, kvl_t, *q.stride(), *k.stride(),
            *v.stride(), *do.stride(), kpm_t.stride(0), H, Nq, Nk, scale * _LOG2E, scale)
    _run("bwd", q, Nq, Nk, B * H, args, meta, configs.get("bwd"))
    return dq, dk, dv


def unsupported_reason(q, k, v, key_padding_mask=None, kv_lens=None):
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
    return None


def flash_attention(q, k, v, *, causal=False, key_padding_mask=None, kv_lens=None, scale=None,
                    configs=None):
    """The fused kernel (same contract as lapvqa.ops.attention). `configs` optionally forces
    {"fwd": (BLOCK_M, BLOCK_N, num_warps, num_stages),
     "bwd": (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages)} (tests, benchmarks)."""
    reason = unsupported_reason(q, k, v, key_padding_mask, kv_lens)
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
