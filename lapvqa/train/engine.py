"""Model + DeepSpeed engine from the config."""

from __future__ import annotations

import logging

import torch

from lapvqa.config import Config, ConfigError
from lapvqa.train.ds_config import deepspeed_config, lr_scheduler, param_groups
from lapvqa.train.ds_patches import batch_overflow_check

log = logging.getLogger("lapvqa.train")


def model_config(cfg: Config):
    from lapvqa.pretrain.model import ModelConfig, get_config
    overrides = dict(cfg.model.overrides)
    if cfg.model.image_size is not None:
        overrides["image_size"] = cfg.model.image_size
    if cfg.train.grad_checkpointing:
        overrides.update(enc_grad_checkpointing=True, dec_grad_checkpointing=True)
    known = {f for f in ModelConfig.__dataclass_fields__}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"model.overrides: unknown ModelConfig keys {unknown}; valid: {', '.join(sorted(known))}")
    try:
        mc = get_config(cfg.model.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.data.max_tokens + 2 > mc.max_positions:
        raise ConfigError(f"data.max_tokens={cfg.data.max_tokens} + 2 EOTs exceeds the model's "
                          f"max_positions={mc.max_positions}")
    return mc


def build_model(cfg: Config):
    # bf16 weights need no input hook: VisionEncoder.forward_tokens casts the normalised images
    # to the patch projection's dtype itself.
    from lapvqa.pretrain.model import CaptioningModel
    mc = model_config(cfg)
    return mc, CaptioningModel(mc)


def resolve_precision(cfg: Config, device: torch.device) -> None:
    """train.precision=auto: bf16 on GPUs; fp32 on CPU, where bf16 works but is slower here."""
    if cfg.train.precision == "auto":
        cfg.train.precision = "bf16" if device.type == "cuda" else "fp32"
        if device.type != "cuda":
            log.info("train.precision=auto on CPU -> fp32 (DeepSpeed's CPU accelerator supports "
                     "bf16 ZeRO-2, but CPUs without native bf16 matmul run it ~2x slower)")


def maybe_compile(cfg: Config, model, device: torch.device) -> None:
    """train.compile: regional torch.compile of every block (CaptioningModel.compile_blocks), in
    place and before deepspeed.initialize, so parameter names and checkpoints are unchanged.
    Inductor runs on CUDA only: its CPU backend compiles for minutes and buys nothing for CPU
    smoke runs; train.compile_backend=aot_eager traces the same graphs on any device."""
    if not cfg.train.compile:
        return
    backend = cfg.train.compile_backend
    if device.type != "cuda" and backend == "inductor":
        log.info("train.compile=true ignored on %s with the inductor backend (regional compile is "
                 "used on CUDA; train.compile_backend=aot_eager checks the graphs here)", device.type)
        return
    log.info("train.compile: torch.compile(backend=%s) of each encoder/decoder block "
             "(first steps compile)", backend)
    model.compile_blocks(backend=backend)


def build_engine(cfg: Config, model, info, load_universal: bool = False):
    """``load_universal``: the checkpoint to load is in DeepSpeed's universal format (elastic
    resume onto another number of ranks, lapvqa.train.elastic)."""
    import deepspeed
    resolve_precision(cfg, info.device)
    maybe_compile(cfg, model, info.device)
    ds = deepspeed_config(cfg, info.world_size, info.device)
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds,
        lr_scheduler=lr_scheduler(cfg))
    if ds.get("bf16", {}).get("check_grad_overflow") and batch_overflow_check(engine.optimizer):
        log.info("DeepSpeed's overflow check batched into one multi-tensor kernel "
                 "(lapvqa.train.ds_patches)")
    return engine
