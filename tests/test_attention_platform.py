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
