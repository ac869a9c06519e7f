"""Our typed config -> the DeepSpeed config dict (ZeRO-2, bf16, clipping, AdamW) + LR schedule.

The warm-up + cosine schedule is a torch LambdaLR handed to ``deepspeed.initialize`` rather than
DeepSpeed's WarmupCosineLR, whose first two updates run at lr = 0 (it starts at iteration -1 and
its linear warm-up starts from 0). Ours: update k (1-based) uses lr * min(1, k / warmup), then
a cosine to lr * min_lr_ratio at max_steps. Its state is saved in every checkpoint by DeepSpeed.
"""

from __future__ import annotations

import functools
import math

import torch

from lapvqa.config import Config


def deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {
            "stage": t.zero_stage,
            "overlap_comm": device.type == "cuda",
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
            "allgather_bucket_size": 5e7,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                       "weight_decay": t.weight_decay,
                       # FusedAdam needs CUDA; on CPU DeepSpeed must use torch's AdamW.
                       "torch_adam": device.type != "cuda"},
        },
        "steps_per_print": 10 ** 9,  # we log ourselves (metrics.jsonl, TensorBoard, tqdm)
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # check_grad_overflow: a non-finite gradient skips the step instead of corrupting weights.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return ds


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
