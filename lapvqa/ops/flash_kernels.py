"""The Triton kernels of the fused attention: forward, backward preprocess, fused backward.

Only ``@triton.jit`` code lives here; launching, launch-config tuning, the custom ops and the public
function are in :mod:`lapvqa.ops.flash_attn` (whose docstring describes the design).

Triton is imported guarded: without triton the module still imports and :data:`AVAILABLE` is
False. Triton decides interpreter vs compiler when a kernel is decorated, i.e. when this module is
imported: ``TRITON_INTERPRET=1`` must be set before that (the CPU tests do, and reload this module
and flash_attn if something imported them earlier without it).
"""

from __future__ import annotations

import os

try:  # the package must import without triton (CPU-only installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test
    triton = None
    tl = None

AVAILABLE = triton is not None
INTERPRET = AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") == "1"
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
            # raw scores; the scale is folded into the exponent's FMA (qk_scale > 0, so the max of
            # the scaled scores is the scaled max): one FP32 op per score instead of two
            qk = _mm(q, tl.trans(k), DOT_PREC)
            if MASKED or HAS_KPM:
                vis = _visible(offs_m, offs_n, n_valid, diag, kpm_base, Nk, CAUSAL and MASKED, HAS_KPM)
                qk = tl.where(vis, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: no NaN
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_ref = m_new
            p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
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
    def _dkdv_inner(dk, dv, k, v, keep_n, q_base, do_base, lse_base, delta_base, dqa_base,
                    sqm, sqd, sdom, sdod, offs_n, offs_d, lo, hi, Nq, diag, qk_scale, sm_scale,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    MASKED: tl.constexpr, KEY_MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                    DOT_PREC: tl.constexpr):
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, offs_m, offs_d, sqm, sqd, Nq, HEAD_DIM, BLOCK_D, True)
            do = _load_rows(do_base, offs_m, offs_d, sdom, sdod, Nq, HEAD_DIM, BLOCK_D, True)
            # rows past Nq read lse=+inf, so their probabilities are exactly 0
            lse = tl.load(lse_base + offs_m, mask=offs_m < Nq, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Nq, other=0.0)
            qkT = _mm(k, tl.trans(q), DOT_PREC)  # [BLOCK_N, BLOCK_M], raw scores
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])  # one FMA per score
            if MASKED:  # causal diagonal blocks
                pT = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pT, 0.0)
            if KEY_MASK:  # only dQ needs it: masked keys' dK/dV rows are zeroed once at the end
                pT = tl.where(keep_n[:, None], pT, 0.0)
            dv = _mma(pT.to(do.dtype), do, dv, DOT_PREC)
            dpT = _mm(v, tl.trans(do), DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk = _mma(dsT.to(q.dtype), q, dk, DOT_PREC)
            if ATOMIC_DQ:
                # this key block's share of dQ for these query rows; the other key blocks' programs
                # add theirs: 5 matmuls per tile instead of 7 (no dQ pass recomputing P and dP),
                # at the price of fp32 atomics whose summation order varies between runs
                dq = _mm(tl.trans(dsT.to(k.dtype)), k, DOT_PREC)  # [BLOCK_M, BLOCK_D], unscaled
                # relaxed: a plain sum needs no ordering (acq_rel, the default, fences each add)
                tl.atomic_add(dqa_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq,
                              mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM),
                              sem="relaxed")
        return dk, dv

    @triton.jit
    def _bwd_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, DQA, KPM, KVL,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sdob, sdoh, sdom, sdod, skpm_b, off_b, off_h, off_bh, start_n,
                        Nq, Nk, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
                        ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
        """dK, dV of keys [start_n, start_n + BLOCK_N): loop over the query blocks that see them
        (and, if ATOMIC_DQ, add their dQ contributions, not yet multiplied by sm_scale, to the fp32
        buffer DQA [B*H, Nq, HEAD_DIM]; the host scales once when it casts the buffer)."""
        q_base = Q + off_b.to(tl.int64) * sqb + off_h.to(tl.int64) * sqh
        do_base = DO + off_b.to(tl.int64) * sdob + off_h.to(tl.int64) * sdoh
        lse_base = LSE + off_bh.to(tl.int64) * Nq
        delta_base = DELTA + off_bh.to(tl.int64) * Nq
        dqa_base = DQA + off_bh.to(tl.int64) * Nq * HEAD_DIM
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
        keep = offs_n < n_valid
        if HAS_KPM:
            keep = keep & (tl.load(KPM + off_b.to(tl.int64) * skpm_b + offs_n, mask=offs_n < Nk, other=0) != 0)
        # padding keys beyond Nk load as zeros, so their dQ share is 0 without a mask
        KEY_MASK: tl.constexpr = ATOMIC_DQ and (HAS_KPM or HAS_KVLEN)
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
            dk, dv = _dkdv_inner(dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, dqa_base,
                                 sqm, sqd, sdom, sdod, offs_n, offs_d, lo, full_lo, Nq, diag,
                                 qk_scale, sm_scale, BLOCK_M, HEAD_DIM, BLOCK_D, True, KEY_MASK,
                                 ATOMIC_DQ, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, dqa_base,
                             sqm, sqd, sdom, sdod, offs_n, offs_d, full_lo, hi, Nq, diag,
                             qk_scale, sm_scale, BLOCK_M, HEAD_DIM, BLOCK_D, False, KEY_MASK,
                             ATOMIC_DQ, DOT_PREC)
        # A masked key never contributed, so its dk/dv rows are zero; other keys are unaffected
        # (their probabilities use the saved lse), so masking once here is exact.
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
            qk = _mm(q, tl.trans(k), DOT_PREC)
            p = tl.math.exp2(qk * qk_scale - lse[:, None])  # one FMA per score
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
            _bwd_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, KPM, KVL,
                            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                            sdob, sdoh, sdom, sdod, skpm_b, off_b, off_h, off_bh, pid * BLOCK_N1,
                            Nq, Nk, qk_scale, sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M1, BLOCK_N1,
                            CAUSAL, HAS_KPM, HAS_KVLEN, False, DOT_PREC)
        if pid * BLOCK_M2 < Nq:
            _bwd_dq_block(Q, K, V, DO, LSE, DELTA, DQ, KPM, KVL,
                          sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                          sdob, sdoh, sdom, sdod, skpm_b, off_b, off_h, off_bh, pid,
                          Nq, Nk, qk_scale, sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M2, BLOCK_N2,
                          CAUSAL, HAS_KPM, HAS_KVLEN, DOT_PREC)

    @triton.jit(do_not_specialize=_SEQ_ARGS)
    def _attn_bwd_atomic(Q, K, V, DO, LSE, DELTA, DQA, DK, DV, KPM, KVL,
                         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         sdob, sdoh, sdom, sdod, skpm_b,
                         H, Nq, Nk, qk_scale, sm_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
                         DOT_PREC: tl.constexpr):
        # FlashAttention-2's backward: program i computes dK/dV of key block i and adds its dQ
        # share to the zeroed fp32 buffer DQA with atomics (no second pass over the keys).
        off_bh = tl.program_id(1)
        _bwd_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, DQA, KPM, KVL,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sdob, sdoh, sdom, sdod, skpm_b, off_bh // H, off_bh % H, off_bh,
                        tl.program_id(0) * BLOCK_N1, Nq, Nk, qk_scale, sm_scale, HEAD_DIM, BLOCK_D,
                        BLOCK_M1, BLOCK_N1, CAUSAL, HAS_KPM, HAS_KVLEN, True, DOT_PREC)
