"""Transformer building blocks of the captioning model.

Every attention goes through :func:`lapvqa.ops.attention` (Triton kernel on CUDA, SDPA elsewhere).
The ViT pieces use timm's module names (``patch_embed.proj``, ``blocks.N.attn.qkv`` ...), so a
vision-encoder ``state_dict`` loads into a stock ``timm`` ``VisionTransformer`` unchanged.

Shapes: B batch, N patch tokens, M visual (pooled) tokens, T text tokens, C encoder width,
d decoder width, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lapvqa.ops import attention

LN_EPS = 1e-6  # timm's ViT LayerNorm eps; used everywhere for one convention


def split_heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """[B, N, parts*H*D] (one fused projection) -> `parts` views of [B, H, N, D].

    Views, not copies: the attention kernels take strided inputs whose last dim is contiguous.
    """
    b, n, width = x.shape
    x = x.view(b, n, parts, heads, width // (parts * heads))  # [B, N, parts, H, D]
    return x.permute(2, 0, 3, 1, 4).unbind(0)  # parts x [B, H, N, D]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args) -> torch.Tensor:
    """Apply blocks in order; blocks with ``grad_checkpoint=True`` recompute in backward."""
    use_ckpt = torch.is_grad_enabled() and x.requires_grad
    for blk in blocks:
        if use_ckpt and blk.grad_checkpoint:
            x = checkpoint(blk, x, *args, use_reentrant=False)
        else:
            x = blk(x, *args)
    return x


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> GELU (exact, as timm) -> fc2."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Bidirectional self-attention with a fused qkv projection (timm's names: qkv, proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = split_heads(self.qkv(x), 3, self.heads)  # 3 x [B, H, N, D]
        return self.proj(merge_heads(attention(q, k, v)))


class ViTBlock(nn.Module):
    """Pre-norm ViT block, parameter names identical to timm's ``Block``."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, mlp)
        self.drop = nn.Dropout(dropout)
        self.grad_checkpoint = False

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (timm's ``patch_embed.proj``); floors like timm (384/14 -> 27)."""

    def __init__(self, patch: int, width: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        x = self.proj(x)  # [B, C, g, g]
        return x.flatten(2).transpose(1, 2)  # [B, N=g*g, C]


def adaptive_pool_matrix(grid: int, out: int) -> torch.Tensor:
    """[out*out, grid*grid] matrix P with P @ tokens == adaptive_avg_pool2d on the token grid.

    A matmul on [B, N, C] avoids two transposes to and from NCHW and is cheap (out² x grid² x C).
    """
    rows = torch.zeros(out, grid, dtype=torch.float64)
    for i in range(out):  # the same windows as torch's adaptive pooling: [floor(i*g/o), ceil((i+1)*g/o))
        lo, hi = (i * grid) // out, -((-(i + 1) * grid) // out)
        rows[i, lo:hi] = 1.0 / (hi - lo)
    return torch.kron(rows, rows).float()  # row-major grid: token (r, c) -> r*grid + c


class CausalSelfAttention(nn.Module):
    """Decoder self-attention; with ``cache`` it appends this call's keys/values (KV cache)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, cache: "LayerCache | None" = None):
        q, k, v = split_heads(self.qkv(x), 3, self.heads)  # 3 x [B, H, T, D]
        if cache is not None:
            k, v = cache.append(k, v)  # [B, H, past+T, D]; causal is bottom-right aligned
        return self.proj(merge_heads(attention(q, k, v, causal=True)))


class CrossAttention(nn.Module):
    """Text queries attend to the visual tokens; keys/values come precomputed (once per image)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, d] projected visual tokens -> (k, v), each [B, H, M, D]."""
        k, v = split_heads(self.kv(memory), 2, self.heads)
        return k, v

    def forward(self, x, mem_kv):
        (q,) = split_heads(self.q(x), 1, self.heads)  # [B, H, T, D]
        return self.proj(merge_heads(attention(q, mem_kv[0], mem_kv[1])))


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the image, MLP."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=LN_EPS)
        self.self_attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width, eps=LN_EPS)
        self.cross_attn = CrossAttention(width, heads)
        self.ln3 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, mlp)
        self.drop = nn.Dropout(dropout)
        self.grad_checkpoint = False

    def forward(self, x, mem_kv, cache=None):
        x = x + self.drop(self.self_attn(self.ln1(x), cache))
        x = x + self.drop(self.cross_attn(self.ln2(x), mem_kv))
        return x + self.drop(self.mlp(self.ln3(x)))


class LayerCache:
    """Preallocated self-attention keys/values of one decoder layer: [B, H, capacity, D]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.length = k, v, 0

    @classmethod
    def empty(cls, batch, heads, capacity, head_dim, *, device, dtype):
        shape = (batch, heads, capacity, head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype),
                   torch.empty(shape, device=device, dtype=dtype))

    def append(self, k, v):
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked for {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i of the new cache is row index[i] of the old one."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


def set_checkpointing(blocks: nn.ModuleList, which) -> None:
    """``which``: bool (all/none), int n (the first n blocks) or an iterable of block indices."""
    n = len(blocks)
    if isinstance(which, bool):
        chosen = set(range(n)) if which else set()
    elif isinstance(which, int):
        if not 0 <= which <= n:
            raise ValueError(f"grad checkpointing: {which} blocks asked, model has {n}")
        chosen = set(range(which))
    else:
        chosen = {int(i) for i in which}
        bad = sorted(i for i in chosen if not 0 <= i < n)
        if bad:
            raise ValueError(f"grad checkpointing: block indices {bad} out of range 0..{n - 1}")
    for i, blk in enumerate(blocks):
        blk.grad_checkpoint = i in chosen

