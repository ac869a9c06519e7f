"""The fused attention kernel (Triton interpreter on CPU) against a float64 reference.

Triton decides interpreter vs compiler when a kernel is decorated, i.e. when
lapvqa.ops.flash_kernels is imported, so TRITON_INTERPRET=1 is set before that import (and the
kernels and lapvqa.ops.flash_attn are reloaded if another test imported them earlier without it).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lapvqa.ops import flash_attn  # noqa: E402
from lapvqa.ops.reference import reference_attention  # noqa: E402

# lapvqa.ops re-exports the function `attention`, which shadows the submodule's name
dispatch = importlib.import_module("lapvqa.ops.attention")
if flash_attn.AVAILABLE and not flash_attn.INTERPRET:
    importlib.reload(flash_attn.kernels)  # the kernels first: triton reads the variable there
    flash_attn = importlib.reload(flash_attn)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not flash_attn.AVAILABLE, reason="triton is not installed"),
]

B, H = 2, 2


def _inputs(nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g, dtype=dtype) for n in (nq, nk, nk))
    do = torch.randn(B, H, nq, d, generator=g, dtype=dtype)
    return q, k, v, do


def _grads(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


# the two backward kernels: fused dK/dV + dQ passes (default) and atomic dQ (FlashAttention-2)
BWD = {"fused": None, "atomic": flash_attn.INTERPRET_ATOMIC_BWD if flash_attn.AVAILABLE else None}


def _check(nq, nk, d, atol=2e-5, bwd="fused", **kw):
    q, k, v, do = _inputs(nq, nk, d)
    if BWD[bwd] is not None:
        kw["configs"] = {"bwd": BWD[bwd]}
    got = _grads(flash_attn.flash_attention, q, k, v, do, **kw)
    kw.pop("configs", None)
    want = _grads(reference_attention, *(t.double() for t in (q, k, v, do)), **kw)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    return got, want


# (nq, nk, d, kwargs): every mode on odd lengths that straddle the 16-wide interpreter blocks
CASES = {
    "self": (33, 33, 64, {}),
    "self_len1": (1, 1, 32, {}),
    "cross_nq<nk": (17, 70, 32, {}),
    "cross_nq>nk": (70, 17, 32, {}),
    "causal_square": (33, 33, 64, {"causal": True}),
    "causal_nq<nk": (17, 70, 32, {"causal": True}),  # bottom-right: KV-cache decoding
    "causal_single_query": (1, 33, 32, {"causal": True}),
    "causal_nq>nk": (70, 33, 32, {"causal": True}),  # first 37 rows see nothing -> zeros
    "head_dim_48_padded": (17, 33, 48, {}),
    "scale": (17, 33, 32, {"scale": 0.3}),
}


@pytest.mark.parametrize("bwd", BWD)
@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name, bwd):
    nq, nk, d, kw = CASES[name]
    _check(nq, nk, d, bwd=bwd, **kw)


@pytest.mark.parametrize("bwd", BWD)
def test_key_padding_mask_and_fully_masked_rows(bwd):
    kpm = torch.rand(B, 70, generator=torch.Generator().manual_seed(1)) > 0.4
    kpm[1] = False  # batch 1: no key at all -> zero output, zero grads
    (out, dq, dk, dv), _ = _check(33, 70, 32, bwd=bwd, key_padding_mask=kpm)
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dk[0][:, ~kpm[0]] == 0).all() and (dv[0][:, ~kpm[0]] == 0).all()


@pytest.mark.parametrize("bwd", BWD)
@pytest.mark.parametrize("causal", [False, True])
def test_kv_lens(causal, bwd):
    lens = torch.tensor([0, 37])
    (out, dq, dk, dv), _ = _check(33, 70, 32, bwd=bwd, causal=causal, kv_lens=lens)
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[1, :, 37:] == 0).all()


@pytest.mark.parametrize("bwd", BWD)
def test_kv_lens_and_mask_together_with_causal(bwd):
    kpm = torch.ones(B, 33, dtype=torch.bool)
    kpm[:, 3] = False
    _check(17, 33, 32, bwd=bwd, causal=True, key_padding_mask=kpm, kv_lens=torch.tensor([20, 33]))


def test_kv_lens_equals_prefix_mask():
    lens = torch.tensor([5, 30])
    kpm = torch.arange(33)[None, :] < lens[:, None]
    q, k, v, _ = _inputs(17, 33, 32)
    a = flash_attn.flash_attention(q, k, v, kv_lens=lens)
    b = flash_attn.flash_attention(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_strided_views_from_fused_qkv():
    """q/k/v as the model makes them: head-split views of one [B, N, 3, H, D] projection."""
    n, d = 33, 32
    qkv = torch.randn(B, n, 3, H, d, generator=torch.Generator().manual_seed(2))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    do = torch.randn(B, H, n, d).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided dO
    got = _grads(flash_attn.flash_attention, q, k, v, do, causal=True)
    want = _grads(reference_attention, q.double(), k.double(), v.double(), do.double(), causal=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bwd", BWD)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, bwd):
    q, k, v, do = _inputs(17, 33, 32, dtype=dtype)
    configs = {"bwd": BWD[bwd]} if BWD[bwd] else None
    got = _grads(flash_attn.flash_attention, q, k, v, do, causal=True, configs=configs)
    want = _grads(reference_attention, *(t.double() for t in (q, k, v, do)), causal=True)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("bwd", BWD)
def test_empty_key_sequence_gives_zeros(bwd):
    q, k, v, do = _inputs(5, 0, 16)
    configs = {"bwd": BWD[bwd]} if BWD[bwd] else None
    out, dq, dk, dv = _grads(flash_attn.flash_attention, q, k, v, do, configs=configs)
    assert out.shape == (B, H, 5, 16) and (out == 0).all() and (dq == 0).all() and dk.shape == k.shape


def test_atomic_dq_candidates_only_when_nondeterminism_is_allowed(monkeypatch):
    atomic = [c for c in flash_attn.BWD_CONFIGS if flash_attn.atomic_dq(c)]
    assert atomic and set(atomic) <= set(flash_attn._candidates("bwd"))  # PyTorch's default: allowed
    monkeypatch.setenv("LAPVQA_ATTENTION_DETERMINISTIC", "1")
    assert not any(flash_attn.atomic_dq(c) for c in flash_attn._candidates("bwd"))
    monkeypatch.delenv("LAPVQA_ATTENTION_DETERMINISTIC")
    torch.use_deterministic_algorithms(True)
    try:
        assert not any(flash_attn.atomic_dq(c) for c in flash_attn._candidates("bwd"))
    finally:
        torch.use_deterministic_algorithms(False)
    assert not flash_attn.atomic_dq(flash_attn.FIXED_CONFIG["bwd"])  # AUTOTUNE=0: deterministic


def test_rejects_bad_input_with_one_line_reason():
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match="head dim 256"):
        flash_attn.flash_attention(q, q, q)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attn.flash_attention(q[..., :16], q[..., :16].double(), q[..., :16])
    with pytest.raises(ValueError, match="scale -0.5 is not > 0"):
        flash_attn.flash_attention(q[..., :16], q[..., :16], q[..., :16], scale=-0.5)


# ------------------------------------------------------------------------------------------
# dispatcher
# ------------------------------------------------------------------------------------------

def test_dispatcher_env_var(monkeypatch):
    q, k, v, _ = _inputs(9, 9, 16)
    monkeypatch.setenv("LAPVQA_ATTENTION", "triton")
    assert dispatch.choose_backend(q, k, v) == "triton"  # CPU + TRITON_INTERPRET=1
    out = dispatch.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("LAPVQA_ATTENTION", "sdpa")
    assert dispatch.choose_backend(q, k, v) == "sdpa"
    monkeypatch.setenv("LAPVQA_ATTENTION", "auto")
    assert dispatch.choose_backend(q, k, v) == "sdpa"  # auto never uses the kernel on CPU
    monkeypatch.setenv("LAPVQA_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="LAPVQA_ATTENTION"):
        dispatch.attention(q, k, v)


def test_dispatcher_cpu_without_interpreter_falls_back(monkeypatch):
    q, k, v, _ = _inputs(9, 9, 16)
    monkeypatch.setenv("LAPVQA_ATTENTION", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match="CPU tensors use SDPA"):
        assert dispatch.choose_backend(q, k, v) == "sdpa"


def test_dispatcher_forced_triton_rejects_unsupported(monkeypatch):
    monkeypatch.setenv("LAPVQA_ATTENTION", "triton")
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match="LAPVQA_ATTENTION=triton: head dim 256"):
        dispatch.attention(q, q, q)


def test_auto_rule_matching():
    rule = dispatch.AutoRule(causal=False, masked=False, head_dims=(64,), nq=(513, 1024),
                             nk=(513, 1024), training=True)
    q = torch.empty(1, 1, 729, 64, dtype=torch.bfloat16)
    assert rule.matches(q, q, False, False, True)
    assert not rule.matches(q, q, True, False, True)
    assert not rule.matches(q, q, False, False, False)
    assert not rule.matches(q.float(), q.float(), False, False, True)
    assert not rule.matches(q[:, :, :256], q[:, :, :256], False, False, True)


@pytest.mark.parametrize("mode", ["sdpa", "triton"])
def test_sdpa_and_kernel_paths_agree_on_contract(monkeypatch, mode):
    """Both backends honour the same contract (masks, bottom-right causal, empty rows)."""
    monkeypatch.setenv("LAPVQA_ATTENTION", mode)
    q, k, v, _ = _inputs(20, 12, 16)
    kpm = torch.ones(B, 12, dtype=torch.bool)
    kpm[0, 5:] = False
    out = dispatch.attention(q, k, v, causal=True, key_padding_mask=kpm)
    want = reference_attention(q, k, v, causal=True, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# torch.compile: the kernel is two opaque custom ops (lapvqa/ops/flash_ops.py), no graph break
# ------------------------------------------------------------------------------------------

def _block(x, w, kpm):
    """What a model block does around attention: fused qkv projection, head-split views."""
    b, n, _ = x.shape
    q, k, v = (x @ w).view(b, n, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return dispatch.attention(q, k, v, causal=True, key_padding_mask=kpm).transpose(1, 2) * 2


def test_kernel_inside_torch_compile_fullgraph(monkeypatch):
    """fullgraph=True fails on any graph break; forward and backward match eager exactly-ish
    (same kernel both ways), and the traced graph calls the kernel op, not SDPA."""
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setenv("LAPVQA_ATTENTION", "triton")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(B, 21, 32, generator=g), torch.randn(32, 3 * H * 16, generator=g) / 6
    kpm = torch.ones(B, 21, dtype=torch.bool)
    kpm[1, 15:] = False
    do = torch.randn(B, 21, H, 16, generator=g)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_block, backend=counter, fullgraph=True)
    results = []
    for fn in (_block, compiled):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xx, ww, kpm)
        out.backward(do)
        results.append((out.detach(), xx.grad, ww.grad))
    for name, a, b in zip(("out", "dx", "dw"), *results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert counter.frame_count == 1
    assert "lapvqa.flash_attn_fwd" in str(counter.graphs[0].code)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake (shape) functions vs the real kernel's outputs and
    strides, autograd registration, and AOTAutograd tracing of both ops."""
    q, k, v, _ = _inputs(17, 20, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kvl = torch.tensor([20, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.lapvqa.flash_attn_fwd.default,
                          (q, k, v, None, kvl, True, 0.25, None, None))
