"""One attention entry point: the project's Triton kernel on CUDA, SDPA elsewhere.

``LAPVQA_ATTENTION=triton|sdpa|auto`` (default ``auto``) selects the backend.

Contract (every caller relies on it):
  q: [B, H, Nq, D], k and v: [B, H, Nk, D], same dtype and device.
  causal: bottom-right aligned, so query i may see keys j <= i + (Nk - Nq); this is what a
      KV-cached decoder needs (the last Nq queries of an Nk-long sequence).
  key_padding_mask: optional [B, Nk] bool, True = a real key that may be attended to.
  kv_lens: optional [B] int, keys at positions >= kv_lens[b] are masked (alternative to the mask).
  scale: softmax scale, default 1/sqrt(D).
Returns [B, H, Nq, D]. A query row with no visible key returns zeros (never NaN).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F


def attention_backend() -> str:
    mode = os.environ.get("LAPVQA_ATTENTION", "auto").lower()
    if mode not in ("auto", "triton", "sdpa"):
        raise ValueError(f"LAPVQA_ATTENTION={mode!r}: expected one of auto, triton, sdpa")
    return mode


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
    # The Triton kernel is wired in by lapvqa.ops.flash_attn (see that module).
    return sdpa_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                          kv_lens=kv_lens, scale=scale)
