"""DeepSpeed's per-step host work at the card's parameter-tensor structure, against a plain step.

    python benchmarks/ds_overhead.py [--device cpu|cuda] [--steps 10]

The model is the card's skeleton: its 24 encoder and 6 decoder blocks and GPT-2 embedding, so the
same 419 parameter tensors, but 64 wide, so compute is negligible and what is left is per-tensor
work: Python, small ops and (on a GPU) kernel launches. Each setup runs in its own process:

  plain       bf16 module + fp32 master weights + AdamW over all tensors (the benchmark's
              +bf16 variant: DeepSpeed bf16's arithmetic without DeepSpeed)
  zero2-stock deepspeed.initialize with the trainer's config (ZeRO-2, bf16, check_grad_overflow)
              and DeepSpeed's own per-tensor overflow check
  zero2       the trainer as it runs: the same with the overflow check batched into one
              multi-tensor kernel (lapvqa.train.ds_patches)
  zero2-noov  without check_grad_overflow (the floor: what any NaN-step guard costs)
  bf16opt     DeepSpeed's BF16_Optimizer (ZeRO-1 with fp32 gradient accumulation), the path
              Megatron-DeepSpeed uses; NOT a trainer option (its checkpoints differ), measured
              to size the alternative

and prints top-level aten ops per step (torch.profiler), those of them that compute (views and
other metadata-only ops left out: on a GPU each of the rest is at least one kernel launch), and
the median step time, with ratios against plain. On the H200, the card's step took
134.6 ms plain and 264.5 ms through DeepSpeed (docs/training.md section 7): this isolates how
much of that gap is per-tensor host work.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SETUPS = ("plain", "zero2-stock", "zero2", "zero2-noov", "bf16opt")
# metadata-only ops (no kernel on a GPU): left out of the "compute ops" count
_VIEW_OPS = {"aten::view", "aten::view_as", "aten::narrow", "aten::detach", "aten::t",
             "aten::_has_compatible_shallow_copy_type", "aten::as_strided", "aten::expand",
             "aten::slice", "aten::select", "aten::alias", "aten::permute", "aten::transpose",
             "aten::unsqueeze", "aten::squeeze", "aten::split", "aten::unbind", "aten::lift_fresh",
             "aten::_unsafe_view", "aten::split_with_sizes", "aten::chunk", "aten::empty",
             "aten::empty_like", "aten::empty_strided", "aten::result_type", "aten::is_nonzero",
             "aten::_local_scalar_dense", "aten::item", "aten::resolve_conj", "aten::resolve_neg"}
SKELETON = dict(image_size=56, enc_width=64, enc_heads=4, enc_mlp=128, pooled_grid=2,
                dec_width=64, dec_heads=4, dec_mlp=128)


def _patch_ds_config(setup: str) -> None:
    import lapvqa.train.ds_config as dsc
    orig = dsc.deepspeed_config

    def patched(*args, **kw):
        ds = orig(*args, **kw)
        if setup == "zero2-noov":
            ds["bf16"]["check_grad_overflow"] = False
        elif setup == "bf16opt":
            ds["zero_optimization"] = {"stage": 1}
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        return ds
    dsc.deepspeed_config = patched


def child(setup: str, device: str, steps: int) -> dict:
    import model as bm  # benchmarks/model.py: the same build and step code as the model benchmark
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lapvqa.pretrain.model import CaptioningModel, get_config, register_preset

    register_preset("skeleton", get_config("card", **SKELETON))
    _patch_ds_config(setup)
    if setup == "zero2-stock":
        os.environ["LAPVQA_DS_STOCK_OVERFLOW_CHECK"] = "1"  # benchmarks/model.py skips the patch
    variant = "eager:sdpa+bf16" if setup == "plain" else "eager:sdpa+ds"
    a = bm.parse_args(["--preset", "skeleton", "--device", device, "--batch-size", "2",
                       "--text-len", "16", "--steps", str(steps), "--warmup", "3", "--dtype",
                       "bf16", "--child", variant])
    a = bm._fill_defaults(a) or a
    v = bm.parse_variant(variant)
    os.environ["LAPVQA_ATTENTION"] = "sdpa"
    torch.manual_seed(0)
    cfg, model, opt = bm.build(a, v, 2)
    batch = bm.make_batch(cfg, 2, a.text_len, a.device)
    bm.timed_steps(a, v, model, opt, batch, 3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        bm.timed_steps(a, v, model, opt, batch, 5)
    events = prof.events()
    top = [e for e in events if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    times, loss = bm.timed_steps(a, v, model, opt, batch, steps)
    opt_name = type(getattr(model, "optimizer", opt)).__name__
    return dict(setup=setup, device=device, optimizer=opt_name,
                tensors=sum(1 for _ in CaptioningModel(get_config("skeleton")).parameters()),
                aten_ops_per_step=len(top) // 5,
                compute_ops_per_step=sum(e.name not in _VIEW_OPS for e in top) // 5,
                step_ms=1e3 * statistics.median(times),
                top_ops=collections.Counter(e.name for e in top).most_common(6), loss=loss)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(child(args.child, device, args.steps)), flush=True)
        return 0
    # rows are printed as they finish: a run cut short by a timeout keeps what it measured
    print(f"{'setup':<11} {'optimizer':<22} {'tensors':>7} {'aten ops/step':>13} "
          f"{'compute ops/step':>16} {'x plain':>8} {'step ms':>8} {'x plain':>8}", flush=True)
    base, rows = None, []
    for setup in args.setups.split(","):
        r = subprocess.run([sys.executable, __file__, "--child", setup, "--device", device,
                            "--steps", str(args.steps)], capture_output=True, text=True, timeout=600)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode or not lines:
            print(f"{setup}: failed: {r.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        row = json.loads(lines[-1])
        rows.append(row)
        base = base or (row if setup == "plain" else None)
        ops_x = row["compute_ops_per_step"] / base["compute_ops_per_step"] if base else float("nan")
        ms_x = row["step_ms"] / base["step_ms"] if base else float("nan")
        print(f"{row['setup']:<11} {row['optimizer']:<22} {row['tensors']:>7} "
              f"{row['aten_ops_per_step']:>13} {row['compute_ops_per_step']:>16} {ops_x:>8.2f} "
              f"{row['step_ms']:>8.1f} {ms_x:>8.2f}", flush=True)
    for r in rows:
        print(f"# {r['setup']}: most frequent ops per 5 steps {r['top_ops']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
