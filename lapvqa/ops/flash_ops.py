"""The Triton kernel's forward and backward as ``torch.library`` custom ops.

Why custom ops: under ``torch.compile`` (the model's ``compile_blocks()``), dynamo would otherwise
trace into the host-side launch code (triton's JIT launcher, the launch-config tuner, which times
candidates with ``triton.testing.do_bench``) and fail. As custom ops with fake (shape-only)
implementations and a registered autograd formula, dynamo/AOTAutograd/inductor see two opaque
ops, ``lapvqa::flash_attn_fwd`` and ``lapvqa::flash_attn_bwd``, with no graph break; their bodies
run eagerly at run time, so tuning on first use still happens outside any trace.

The op bodies reach the kernels through ``importlib`` on each call (a dict lookup once imported)
rather than a module-level import: the tests reload ``lapvqa.ops.flash_attn`` after setting
TRITON_INTERPRET=1, and the ops must not be registered twice, so they live here, in a module that
is imported once and never reloaded.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor


def _kernels():
    return importlib.import_module("lapvqa.ops.flash_attn")


def _configs(fwd_config, bwd_config) -> dict:
    cfg = {}
    if fwd_config is not None:
        cfg["fwd"] = tuple(fwd_config)
    if bwd_config is not None:
        cfg["bwd"] = tuple(bwd_config)
    return cfg


# The forward op takes the backward's launch config too, only to hand it to the backward
# (custom ops carry no Python state between the two).
@torch.library.custom_op("lapvqa::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], kvl: Optional[Tensor],
                   causal: bool, scale: float, fwd_config: Optional[list[int]] = None,
                   bwd_config: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    """(out [B, H, Nq, D], lse [B*H, Nq] fp32, log2 domain). kpm: uint8 [B, Nk], kvl: int32 [B]."""
    return _kernels()._forward(q, k, v, causal, kpm, kvl, scale, _configs(fwd_config, None))


@flash_attn_fwd.register_fake
def _fwd_fake(q, k, v, kpm, kvl, causal, scale, fwd_config=None, bwd_config=None):
    B, H, Nq, D = q.shape  # same (contiguous) layouts as _forward allocates
    return q.new_empty((B, H, Nq, D)), q.new_empty((B * H, Nq), dtype=torch.float32)


@torch.library.custom_op("lapvqa::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                   kpm: Optional[Tensor], kvl: Optional[Tensor], causal: bool, scale: float,
                   bwd_config: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each contiguous with q/k/v's shape."""
    return _kernels()._backward(do, q, k, v, o, lse, causal, kpm, kvl, scale,
                                _configs(None, bwd_config))


@flash_attn_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, kpm, kvl, causal, scale, bwd_config=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, kvl, causal, scale, _fwd_config, bwd_config = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kpm, kvl)
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.scale, ctx.bwd_config = causal, scale, bwd_config


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, kpm, kvl = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, kpm, kvl, ctx.causal, ctx.scale,
                                ctx.bwd_config)
    return dq, dk, dv, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
