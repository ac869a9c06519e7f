"""One attention entry point: the project's Triton kernel on CUDA, SDPA elsewhere.

``LAPVQA_ATTENTION=triton|sdpa|auto`` (default ``auto``) selects the backend:
  sdpa    always torch.nn.functional.scaled_dot_product_attention.
  triton  the fused kernel (lapvqa.ops.flash_attn) for CUDA tensors; an input the kernel cannot
          take is a ValueError. CPU tensors use it only when TRITON_INTERPRET=1 (tests);
          otherwise they fall back to SDPA with a one-time warning.
  auto    the kernel only where benchmarks/attention.py measured it faster than the best SDPA
          backend (:data:`AUTO_KERNEL_RULES`), SDPA everywhere else (CPU always).

Contract (every caller relies on it):
  q: [B, H, Nq, D], k and v: [B, H, Nk, D], same dtype and device.
  causal: bottom-right aligned, so query i may see keys j <= i + (Nk - Nq); this is what a
      KV-cached decoder needs (the last Nq queries of an Nk-long sequence).
  key_padding_mask: optional [B, Nk] bool, True = a real key that may be attended to.
  kv_lens: optional [B] int, keys at positions >= kv_lens[b] are masked (alternative to the mask).
  scale: softmax scale, default 1/sqrt(D) (the kernel needs scale > 0; SDPA takes any).
Returns [B, H, Nq, D]. A query row with no visible key returns zeros (never NaN).

Works inside torch.compile'd regions (fullgraph too): the dispatch is plain traceable Python and
the kernel enters the graph as two opaque custom ops (lapvqa/ops/flash_ops.py).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AutoRule:
    """Inputs for which "auto" runs the kernel (all fields must match; ranges are inclusive)."""

    causal: bool
    masked: bool  # key_padding_mask or kv_lens given
    head_dims: tuple[int, ...]
    nq: tuple[int, int]
    nk: tuple[int, int]
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    training: bool | None = None  # True: only with autograd, False: only without, None: both

    def matches(self, q, k, causal, masked, training) -> bool:
        return (self.causal == causal and self.masked == masked
                and q.shape[-1] in self.head_dims
                and str(q.dtype).removeprefix("torch.") in self.dtypes
                and self.nq[0] <= q.shape[-2] <= self.nq[1]
                and self.nk[0] <= k.shape[-2] <= self.nk[1]
                and (self.training is None or self.training == training))


# Where "auto" picks the kernel on CUDA: the cases where benchmarks/attention.py measured the
# kernel at >= 1.0x the best SDPA backend (that script prints these rules from its results).
# Source: H200 run 3 (benchmarks/results/h200_run3/attention.log; bf16, D=64, batch 32, torch
# 2.11 + triton 3.6, fused backward). Only measured wins; every other case (ViT 729 x0.97 fwd /
# x0.89 fwd+bwd, unpadded decoder fwd+bwd x0.72-x0.81, cross-attention x0.28-x0.54) stays SDPA.
AUTO_KERNEL_RULES: tuple[AutoRule, ...] = (
    # causal decoder inference: 0.116 vs 0.123 ms (efficient), x1.06
    AutoRule(causal=True, masked=False, head_dims=(64,), nq=(129, 256), nk=(129, 256),
             training=False),
    # causal decoder inference: 0.121 vs 0.145 ms (efficient), x1.19
    AutoRule(causal=True, masked=False, head_dims=(64,), nq=(257, 512), nk=(257, 512),
             training=False),
    # key-padded causal decoder (a mask pushes SDPA off flash/cuDNN): fwd 0.116 vs 0.397 ms
    # (cuDNN), x3.42; fwd+bwd 0.455 vs 0.847 ms (efficient), x1.86
    AutoRule(causal=True, masked=True, head_dims=(64,), nq=(129, 256), nk=(129, 256),
             training=None),
)

_warned: set[str] = set()


def attention_backend() -> str:
    mode = os.environ.get("LAPVQA_ATTENTION", "auto").lower()
    if mode not in ("auto", "triton", "sdpa"):
        raise ValueError(f"LAPVQA_ATTENTION={mode!r}: expected one of auto, triton, sdpa")
    return mode


def _flash():
    """lapvqa.ops.flash_attn, imported on first use (triton reads TRITON_INTERPRET at import).
    A plain import statement, not importlib: dynamo traces it inside torch.compile'd regions."""
    from lapvqa.ops import flash_attn
    return flash_attn


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(q, k, v, *, causal=False, key_padding_mask=None, kv_lens=None, scale=None) -> str:
    """'triton' or 'sdpa' for these inputs under the current LAPVQA_ATTENTION setting."""
    mode = attention_backend()
    if mode == "sdpa":
        return "sdpa"
    on_cuda = q.device.type == "cuda"
    if mode == "triton":
        if not on_cuda and not _interpret_requested():
            _warn_once("LAPVQA_ATTENTION=triton: CPU tensors use SDPA (set TRITON_INTERPRET=1 "
                       "to run the kernel in the Triton interpreter)")
            return "sdpa"
        reason = _flash().unsupported_reason(q, k, v, key_padding_mask, kv_lens, scale)
        if reason is not None:
            raise ValueError(f"LAPVQA_ATTENTION=triton: {reason}")
        return "triton"
    if not on_cuda or not AUTO_KERNEL_RULES:
        return "sdpa"
    masked = key_padding_mask is not None or kv_lens is not None
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not any(r.matches(q, k, bool(causal), masked, training) for r in AUTO_KERNEL_RULES):
        return "sdpa"
    fa = _flash()
    return "triton" if fa.unsupported_reason(q, k, v, key_padding_mask, kv_lens, scale) is None else "sdpa"


def _sdpa_mask(q, k, causal, key_padding_mask, kv_lens):
    """Boolean [B, 1, Nq, Nk] mask (True = may attend) or None when nothing is masked."""
    nq, nk = q.shape[-2], k.shape[-2]
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
    if kv_lens is not None:
        pos = torch.arange(nk, device=q.device)
        m = (pos[None, :] < kv_lens[:, None].to(q.device))[:, None, None, :]
        mask = m if mask is None else mask & m
    if causal:
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        c = (j <= i + (nk - nq))[None, None]
        mask = c if mask is None else mask & c
    return mask


def sdpa_attention(q, k, v, *, causal=False, key_padding_mask=None, kv_lens=None, scale=None):
    mask = _sdpa_mask(q, k, causal, key_padding_mask, kv_lens)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if causal and key_padding_mask is None and kv_lens is None and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Rows with no visible key come back NaN from SDPA; the contract says zeros.
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)


def attention(q, k, v, *, causal=False, key_padding_mask=None, kv_lens=None, scale=None):
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    backend = choose_backend(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                             kv_lens=kv_lens, scale=scale)
    if backend == "triton":
        return _flash().flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                        kv_lens=kv_lens, scale=scale)
    return sdpa_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                          kv_lens=kv_lens, scale=scale)
