"""Our typed config -> the DeepSpeed config dict (ZeRO-2, bf16, clipping, AdamW) + LR schedule.

Why each DeepSpeed setting is what it is: comments in ``zero_config`` / ``optimizer_impl`` and
docs/training.md 'Performance'.

The warm-up + cosine schedule is a torch LambdaLR handed to ``deepspeed.initialize`` rather than
DeepSpeed's WarmupCosineLR, whose first two updates run at lr = 0 (it starts at iteration -1 and
its linear warm-up starts from 0). Ours: update k (1-based) uses lr * min(1, k / warmup), then
a cosine to lr * min_lr_ratio at max_steps. Its state is saved in every checkpoint by DeepSpeed.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from lapvqa.config import Config

log = logging.getLogger("lapvqa.train")


def deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero_config(t.zero_stage, world_size, device),
        "optimizer": {"type": "AdamW",
                      "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                 "weight_decay": t.weight_decay, **optimizer_impl(t.optimizer_impl, device)}},
        "steps_per_print": 10 ** 9,  # we log ourselves (metrics.jsonl, TensorBoard, tqdm)
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # check_grad_overflow: a non-finite gradient skips the step instead of corrupting weights.
        # Required, not optional: without it DeepSpeed 0.19 also ignores a non-finite grad norm
        # under bf16 and applies the (NaN) update. DeepSpeed's check costs ~7 small ops per
        # gradient tensor plus one host sync per step; build_engine batches it into one
        # multi-tensor kernel (lapvqa.train.ds_patches).
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return ds


def zero_config(stage: int, world_size: int, device: torch.device) -> dict:
    """ZeRO settings. CPU (gloo tests, smoke runs) keeps the settings the tests were written
    against; CUDA gets the ones read off DeepSpeed 0.19's stage_1_and_2.py for fewer per-bucket
    stalls. The CUDA choices are NOT yet measured on a GPU (docs/training.md, Performance)."""
    if device.type != "cuda":
        return {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    return {
        "stage": stage,
        # With overlap_comm DeepSpeed calls a full device synchronize() before every bucket
        # reduction (allreduce_and_copy) and at the end of backward: worth it only when there is
        # communication to hide, i.e. more than one rank. On one GPU it just drains the pipeline.
        "overlap_comm": world_size > 1,
        # Gradients are copied into one preallocated buffer as they are produced: no allocator
        # fragmentation over 10^4 steps, and the reduction reads one contiguous tensor.
        "contiguous_gradients": True,
        # 2e8 elements (bf16: 0.4 GB, x2 double-buffered with overlap_comm): the card's 355M
        # parameters (419 tensors) flush in 2 buckets instead of ~8 at 5e7, so 2 syncs and 2
        # rounds of per-bucket flatten/copy launches per backward, while the first bucket (the
        # decoder and the top encoder blocks) is still reduced during the rest of backward.
        "reduce_bucket_size": 2e8,
        # The post-step all-gather of updated bf16 weights is not overlapped with anything:
        # one bucket covering the whole model (5e8 > 355M) = one collective instead of ~8.
        "allgather_bucket_size": 5e8,
    }


def optimizer_impl(impl: str, device: torch.device) -> dict:
    """DeepSpeed optimizer params that pick the AdamW implementation.

    ZeRO hands the optimizer one flat fp32 partition per param group (2 tensors), so every
    implementation is a handful of launches; what differs is set-up. "torch" (default): torch's
    AdamW, fused=True on CUDA (one kernel per tensor; what the H200 benchmark's DeepSpeed
    variant ran). "fused": DeepSpeed's FusedAdam, which JIT-builds a CUDA extension on first
    use (needs nvcc matching torch's CUDA; ~1 min per node, cached in ~/.cache/torch_extensions)
    unless DeepSpeed was installed with DS_BUILD_FUSED_ADAM=1. FusedAdam needs CUDA: on CPU
    both mean torch's AdamW (its default single-tensor loop, as the tests always ran).
    """
    if device.type != "cuda":
        if impl == "fused":
            log.info("train.optimizer_impl=fused needs CUDA; using torch's AdamW on %s", device.type)
        return {"torch_adam": True}
    if impl == "fused":
        return {"torch_adam": False}  # deepspeed.ops.adam.FusedAdam (adam_w_mode: AdamW)
    return {"torch_adam": True, "fused": True}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms, embeddings and position tables (all < 2-D or named)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(("pos_embed", "wte.weight", "wpe.weight")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(done: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update after ``done`` updates."""
    if done < warmup:
        return (done + 1) / warmup
    progress = min(1.0, (done - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(cfg: Config):
    """Callable DeepSpeed applies to its base optimizer (DeepSpeed steps it once per update)."""
    t = cfg.train
    f = functools.partial(lr_factor, warmup=t.warmup_steps, total=t.max_steps, min_ratio=t.min_lr_ratio)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, f)
