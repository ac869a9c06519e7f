"""Make a real DeepSpeed ZeRO-2 bf16 run dir with N CPU (gloo) ranks, in the trainer's layout.

    python tests/zero_ckpt_helper.py OUT_RUN_DIR --world 2 --preset tiny --steps 2

run_dir/config.yaml, run_dir/checkpoints/global_step{N}/ (DeepSpeed save_checkpoint, client_state
with step/config/model_config/data_state), COMPLETE written by rank 0 after a barrier, ``latest``,
``best.json`` (the step-1 checkpoint is the "best"), plus run_dir/engine_logits.pt: the engine's
logits on a fixed batch after the last step (for the consolidated-equals-engine test).
Used by the consolidate tests; same optimizer/param-group/ZeRO settings as lapvqa.train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket

import torch
import torch.multiprocessing as mp


def fixed_batch(config, n: int = 2, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, config.image_size, config.image_size), generator=g,
                           dtype=torch.uint8)
    tokens = torch.randint(0, 50256, (n, 12), generator=g)
    tokens[:, 0] = 50256
    tokens[:, -1] = 50256
    return images, tokens, torch.ones_like(tokens, dtype=torch.bool)


def _rank(rank: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch.distributed as dist

    from lapvqa.pretrain.model import CaptioningModel, get_config
    from lapvqa.train.ds_config import param_groups

    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    config = get_config(args.preset)
    model = CaptioningModel(config)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "train_batch_size": world, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01,
                                                    "torch_adam": True}},
          "bf16": {"enabled": True}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01),
                                      config=ds)
    ckdir = os.path.join(args.run_dir, "checkpoints")
    images, tokens, mask = fixed_batch(config, 1, seed=rank)
    for step in range(1, args.steps + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = engine(images, tokens, mask)
        engine.backward(loss)
        engine.step()
        tag = f"global_step{step}"
        client = {"step": step, "config": {"train": {"max_steps": args.steps}},
                  "model_config": dataclasses.asdict(config), "data_state": {"epoch": 0}}
        engine.save_checkpoint(ckdir, tag=tag, client_state=client)
        dist.barrier()
        if rank == 0:
            with open(os.path.join(ckdir, tag, "COMPLETE"), "w") as f:
                json.dump({"step": step, "world_size": world}, f)
            with open(os.path.join(ckdir, "best.json"), "w") as f:
                json.dump({"tag": "global_step1", "step": 1, "val_loss": 9.5}, f)
        dist.barrier()
    if rank == 0:
        engine.module.eval()
        imgs, toks, msk = fixed_batch(config)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _, logits = engine.module(imgs, toks, msk, return_logits=True)
        torch.save(logits.float(), os.path.join(args.run_dir, "engine_logits.pt"))
        with open(os.path.join(args.run_dir, "config.yaml"), "w") as f:
            f.write(f"model:\n  preset: {args.preset}\ntrain:\n  max_steps: {args.steps}\n")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    os.makedirs(args.run_dir, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(args.world, port, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
