"""Compile the attention kernels for a real GPU target without a GPU (triton ships ptxas).

The CPU tests run the kernels in the Triton interpreter, which accepts constructs the real
compiler rejects and says nothing about shared memory or register spills. This module runs the
full Triton -> PTX -> cubin pipeline for e.g. sm_90 (H100/H200) on any machine and reports each
kernel's shared memory and spill stores, so a broken or resource-starved config is caught before
a GPU run. Must run in a process without TRITON_INTERPRET=1 (``python -m lapvqa.ops.compile_check``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

_DT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_TENSOR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_ARGS = {"LSE", "DELTA", "DQA"}
_UNIT_STRIDES = {"sqd", "skd", "svd", "sod", "sdod"}  # contiguous head dim: triton folds ==1
_SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90


def _signature(kernel, dtype, constexprs):
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            sig[name], consts[name] = "constexpr", 1
        elif name in _TENSOR_ARGS or name in _FP32_ARGS or name in ("KPM", "KVL"):
            sig[name] = ("*" + _DT[dtype] if name in _TENSOR_ARGS else
                         "*fp32" if name in _FP32_ARGS else "*u8" if name == "KPM" else "*i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("s") and name != "skpm_b":  # strides of [B,H,N,64] views
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, consts


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from the bundled ptxas (-v); {} if it could not tell."""
    from triton.backends.nvidia import compiler as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            err = subprocess.run([tool, "-v", f"-arch=sm_{arch}{suffix}", src, "-o",
                                  os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                                 timeout=120).stderr
        except (OSError, subprocess.SubprocessError):
            return {}
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None}


def _compile(stage, config, *, dtype="bfloat16", head_dim=64, causal=False, kpm=False,
             kvlen=False, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lapvqa.ops import flash_attn as fa

    kernel = {"fwd": fa.kernels._attn_fwd, "bwd": fa.kernels._attn_bwd}[stage]
    if stage == "fwd":
        bm, bn, warps, stages = config
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn)
    elif fa.atomic_dq(config):
        m1, n1, _, _, warps, stages = config
        kernel, blocks = fa.kernels._attn_bwd_atomic, dict(BLOCK_M1=m1, BLOCK_N1=n1)
    else:
        m1, n1, m2, n2, warps, stages = config
        blocks = dict(BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                      **blocks, CAUSAL=causal, HAS_KPM=kpm, HAS_KVLEN=kvlen,
                      DOT_PREC="ieee" if dtype == "float32" else "tf32")
    sig, attrs, consts = _signature(kernel, dtype, constexprs)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": warps, "num_stages": stages})
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=target,
                          options=options.__dict__)


def compile_one(stage, config, *, dtype="bfloat16", head_dim=64, causal=False, kpm=False,
                kvlen=False, arch=90):
    compiled = _compile(stage, config, dtype=dtype, head_dim=head_dim, causal=causal, kpm=kpm,
                        kvlen=kvlen, arch=arch)
    shared = int(compiled.metadata.shared)
    return {"stage": stage, "config": list(config), "dtype": dtype, "head_dim": head_dim,
            "causal": causal, "kpm": kpm, "kvlen": kvlen, "shared": shared,
            **_ptxas_usage(compiled.asm["ptx"], arch), "fits": shared <= _SMEM_LIMIT}


_LOOP_OPS = ("HGMMA", "HMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "F2FP", "REDG",
             "ATOMG", "LDGSTS", "BAR")


def loop_mix(stage, config, arch=90, **kw) -> list[dict]:
    """Per loop of the kernel's SASS (each backward branch), its instruction count and the mix of
    the opcodes that matter here (tensor-core MMA, MUFU exp2, FP32 ALU, atomics, async copies).
    Static, per warp and iteration: a proxy for issue pressure where no GPU is at hand."""
    import collections

    from triton.backends.nvidia import compiler as nv

    cubin = _compile(stage, config, arch=arch, **kw).asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(os.path.dirname(nv.__file__), "bin", "nvdisasm"), "-c",
                               f.name], capture_output=True, text=True, timeout=120).stdout
    label_at, pending, code = {}, None, []
    for line in text.splitlines():
        if m := re.match(r"^\s*\.(L_x_\d+):", line):
            pending = m.group(1)
        elif m := re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);", line):
            addr = int(m.group(1), 16)
            if pending:
                label_at[pending], pending = addr, None
            code.append((addr, re.sub(r"^@!?U?P\w+\s+", "", m.group(2))))
    loops = []
    for addr, ins in code:
        m = re.search(r"\bBRA\b.*\(\.(L_x_\d+)\)", ins)
        if m and label_at.get(m.group(1), addr) < addr:  # a backward branch closes a loop
            body = [i for a, i in code if label_at[m.group(1)] <= a <= addr]
            ops = collections.Counter(i.split()[0].split(".")[0] for i in body)
            loops.append({"stage": stage, "config": list(config), **kw, "instructions": len(body),
                          **{k: ops[k] for k in _LOOP_OPS if ops[k]}})
    return loops


def default_cases():
    """Every autotune config for the model's cases, plus the fixed config for the other modes."""
    from lapvqa.ops import flash_attn as fa

    for stage, cfgs in fa.CONFIGS.items():
        for cfg in cfgs:
            for causal in (False, True):
                yield stage, cfg, dict(causal=causal)
        fixed = fa.FIXED_CONFIG[stage]
        yield stage, fixed, dict(kpm=True, causal=True)
        yield stage, fixed, dict(kvlen=True)
        yield stage, fixed, dict(dtype="float16")
        yield stage, fa._FP32_CONFIG[stage], dict(dtype="float32")
        yield stage, fixed, dict(head_dim=32)
        yield stage, fa._WIDE_CONFIG[stage], dict(head_dim=128)
        yield stage, fa._WIDE_CONFIG[stage], dict(head_dim=80, causal=True, kpm=True)
    atomic = next(c for c in fa.BWD_CONFIGS if fa.atomic_dq(c))  # its key-mask path too
    yield "bwd", atomic, dict(kpm=True, causal=True)
    yield "bwd", atomic, dict(kvlen=True, dtype="float16")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="only the fixed config, bf16, D=64")
    ap.add_argument("--loops", action="store_true",
                    help="instead: the SASS instruction mix of each kernel loop, model configs")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")
        return 2
    from lapvqa.ops import flash_attn as fa

    if not fa.AVAILABLE:
        print("compile_check: triton is not installed")
        return 2
    if args.loops:
        for stage, cfgs in fa.CONFIGS.items():
            for cfg in cfgs:
                for rec in loop_mix(stage, cfg, arch=args.arch):
                    print(json.dumps(rec), flush=True)
        return 0
    cases = list(default_cases())
    stage_cfgs = fa.CONFIGS
    if args.quick:
        atomic = next(c for c in fa.BWD_CONFIGS if fa.atomic_dq(c))
        cases = [(s, fa.FIXED_CONFIG[s], dict(causal=c)) for s in ("fwd", "bwd")
                 for c in (False, True)] + [("fwd", fa.FIXED_CONFIG["fwd"], dict(kpm=True, kvlen=True)),
                                            ("bwd", atomic, dict(causal=True, kpm=True))]
    bad = 0
    for stage, cfg, kw in cases:
        try:
            rec = compile_one(stage, cfg, arch=args.arch, **kw)
            # an autotune config that does not fit is skipped by the autotuner (and reported
            # here); the fixed config (LAPVQA_ATTENTION_AUTOTUNE=0) must fit. Spills are reported.
            rec["ok"] = rec["fits"] or cfg in stage_cfgs[stage]
        except Exception as e:  # noqa: BLE001 - report every failing case, keep going
            rec = {"stage": stage, "config": list(cfg), **kw, "ok": False,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        bad += not rec["ok"]
        print(json.dumps(rec), flush=True)
    print(f"compile_check: {len(cases) - bad}/{len(cases)} ok for sm_{args.arch}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
