"""Plain PyTorch attention with the dispatcher's exact contract: the test oracle.

Materialises the full [B, H, Nq, Nk] score matrix, so use it on small shapes (or float64 on
CPU for tests). Autograd flows through it like any PyTorch code.
"""

from __future__ import annotations

import math

import torch


def visible_mask(nq, nk, *, causal=False, key_padding_mask=None, kv_lens=None, batch=None,
                 device=None):
    """Bool [B or 1, 1, Nq, Nk]: True where query i may attend to key j."""
    vis = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    if causal:  # bottom-right aligned: query i sees keys j <= i + (nk - nq)
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nk, device=device)[None, :]
        vis = vis & (j <= i + (nk - nq))[None, None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if kv_lens is not None:
        pos = torch.arange(nk, device=device)
        vis = vis & (pos[None, :] < kv_lens.to(device)[:, None])[:, None, None, :]
    return vis


def reference_attention(q, k, v, *, causal=False, key_padding_mask=None, kv_lens=None, scale=None):
    """softmax(scale * q k^T + mask) v in q's dtype; rows with no visible key give zeros."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    vis = visible_mask(q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask,
                       kv_lens=kv_lens, device=q.device)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    # a fully masked row: max is -inf; use 0 there so exp gives 0 instead of NaN
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return p @ v
