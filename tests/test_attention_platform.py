"""Attention without triton, and the kernels through the real GPU compiler (no GPU needed).

Both run in subprocesses: one hides triton from the import system, the other must not have
TRITON_INTERPRET=1 (which test_attention.py sets for its own process).
"""

import json
import os
import subprocess
import sys

import pytest

_NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # "import triton" now raises ImportError, find_spec says absent
import torch
from lapvqa.ops import attention
from lapvqa.ops import flash_attn
from lapvqa.ops.attention import choose_backend
assert not flash_attn.AVAILABLE
q = torch.randn(2, 2, 5, 16)
out = attention(q, q, q, causal=True)
assert out.shape == q.shape and torch.isfinite(out).all()
assert choose_backend(q, q, q) == "sdpa"
try:
    flash_attn.flash_attention(q, q, q)
except ValueError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("flash_attention ran without triton")
print("ok")
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LAPVQA_ATTENTION")}
    env.update(extra)
    return env


@pytest.mark.timeout(120)
def test_package_works_without_triton():
    for mode in ("auto", "sdpa", "triton"):
        r = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True,
                           env=_env(LAPVQA_ATTENTION=mode), timeout=110)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (mode, r.stderr[-2000:])


def _ptxas_available():
    try:
        from triton.backends.nvidia import compiler as nv
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


@pytest.mark.timeout(240)
@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_hopper():
    """Triton -> PTX -> cubin for sm_90 with the fixed configs, causal and masked variants:
    catches what the interpreter accepts but the compiler rejects, and oversized tiles."""
    r = subprocess.run([sys.executable, "-m", "lapvqa.ops.compile_check", "--quick", "--arch", "90"],
                       capture_output=True, text=True, env=_env(), timeout=230)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert {rec["stage"] for rec in recs} == {"fwd", "bwd"}
    for rec in recs:
        assert rec["fits"], rec
        assert rec.get("spill_bytes") in (0, None) or rec["kpm"], rec  # hot paths must not spill


_LOOPS = """
import json
from lapvqa.ops import compile_check as cc, flash_attn as fa
fused = cc.loop_mix("bwd", fa.FIXED_CONFIG["bwd"])
atomic = cc.loop_mix("bwd", next(c for c in fa.BWD_CONFIGS if fa.atomic_dq(c) and c[0] == 64))
print(json.dumps(dict(fused=fused, atomic=atomic)))
"""


@pytest.mark.timeout(240)
@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_atomic_dq_backward_halves_the_exp2_work_in_sass():
    """What the atomic-dQ kernel is for, read off the sm_90 SASS (nvdisasm): per score element its
    loop issues one exp2 where the fused kernel's dK/dV and dQ loops issue two, with wgmma
    (HGMMA) for every product and vectorised fp32 reductions (REDG) for dQ."""
    r = subprocess.run([sys.executable, "-c", _LOOPS], capture_output=True, text=True, env=_env(),
                       timeout=230)
    assert r.returncode == 0, r.stderr[-3000:]
    mix = json.loads(r.stdout.strip().splitlines()[-1])
    fused, atomic = mix["fused"], mix["atomic"]
    m1, n1, m2, n2, warps, _ = fused[0]["config"]
    # non-causal, unmasked: fused = dK/dV loop + dQ loops (full blocks, ragged tail); atomic = 1
    assert len(atomic) == 1 and len(fused) == 3, (fused, atomic)
    threads = 32 * warps
    fused_exp_per_elem = (fused[0]["MUFU"] / (m1 * n1 / threads) + fused[1]["MUFU"] / (m2 * n2 / threads))
    a = atomic[0]
    am1, an1, _, _, awarps, _ = a["config"]
    atomic_exp_per_elem = a["MUFU"] / (am1 * an1 / (32 * awarps))
    assert fused_exp_per_elem == 2 and atomic_exp_per_elem == 1, (fused, a)
    assert a.get("REDG", 0) > 0 and a["HGMMA"] > 0 and "HMMA" not in a, a
