"""Streaming, verified reader of DeepSpeed ZeRO-1/2 checkpoints (fp32 master weights).

DeepSpeed's own reader (``deepspeed.utils.zero_to_fp32``) concatenates every rank's flat fp32
partition into one vector and then slices parameters out of it: about twice the fp32 model size
in RAM, and it unpickles arbitrary objects (``weights_only=False``). This reader follows the same
layout rules (param_shapes order per param group, per-parameter alignment paddings, partitions in
rank order, groups padded to 2*world_size) but:

- streams: the output tensors are allocated once and each rank's optimizer file is memory-mapped
  and copied from in 64 MiB chunks whose pages are released right after, so peak memory is about
  the fp32 size of the parameters asked for;
- loads with ``weights_only=True``; the few DeepSpeed objects an optimizer file pickles (loss
  scaler, stage enum, fragment addresses) map to inert stand-ins, so DeepSpeed need not even be
  installed to consolidate;
- checks that every element of every parameter is written exactly once, that the partitions add
  up, and that the fp32 master weights rounded to the module's dtype equal the weights DeepSpeed
  saved in the module state (so the offsets are provably right);
- restores tied/shared parameters as one tensor under both names (``torch.save`` keeps the tie).
"""

from __future__ import annotations

import ctypes
import glob
import math
import mmap
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lapvqa.release.artifacts import ReleaseError

MODEL_STATES = "mp_rank_00_model_states.pt"
_OPTIM_RE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class CheckpointError(ReleaseError):
    """A checkpoint that cannot be consolidated safely."""


class _Opaque:
    """Stand-in for DeepSpeed's pickled helper objects (loss scaler, fragment addresses): their
    state is kept as attributes, nothing of DeepSpeed is imported or executed."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _Stage(int):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (an int enum)."""


# The only globals a ZeRO-1/2 optimizer file pickles besides tensors and builtins.
_SAFE_GLOBALS = [
    (_Opaque, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Opaque, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Opaque, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_Stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]
_CHUNK = 1 << 24  # elements per copy step (64 MiB of fp32) before its source pages are dropped
_PAGE = mmap.PAGESIZE
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _MADV_DONTNEED = 4
except OSError:  # no libc (exotic platforms): pages are simply left to the kernel
    _LIBC = None


def _drop_pages(t: torch.Tensor) -> None:
    """Release the resident pages of a slice of a *memory-mapped* (read-only, MAP_PRIVATE) tensor.

    Clean file-backed pages are re-read from the file if touched again, so this only changes
    what counts towards RSS: without it, copying a 1-rank checkpoint's partition would keep the
    whole partition resident next to the output. Never call it on anonymous memory.
    """
    if _LIBC is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a, b = -(-start // _PAGE) * _PAGE, (end // _PAGE) * _PAGE
    if b > a:
        _LIBC.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED)


def load_file(path: str) -> dict:
    """torch.load with weights_only=True and mmap: nothing is read until it is touched."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt/truncated/foreign pickle: one line, with the file
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read safely ({msg})") from None


@dataclass
class ZeroCheckpoint:
    tag_dir: str
    optim_files: list[str]  # rank order
    param_shapes: list[dict]  # per param group: name -> torch.Size, in flat order
    buffers: dict  # persistent buffers (module state)
    frozen: dict  # name -> full tensor (ZeRO-1/2 keep frozen params whole)
    shared: dict  # alias name -> source name (tied parameters)
    module_dtypes: dict  # name -> dtype of the module weights DeepSpeed saved
    client_state: dict
    world_size: int

    def names(self) -> dict[str, tuple]:
        """Every name the consolidated state_dict will hold -> its shape."""
        out = {n: tuple(s) for g in self.param_shapes for n, s in g.items()}
        out.update({n: tuple(t.shape) for n, t in {**self.buffers, **self.frozen}.items()})
        for alias, src in self.shared.items():
            if src in out:
                out[alias] = out[src]
        return out


def _optim_files(tag_dir: str) -> list[str]:
    found = {}
    for path in glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        m = _OPTIM_RE.search(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    if not found:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer partitions (*_optim_states.pt)")
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{tag_dir}: optimizer partitions of ranks {sorted(found)} "
                              f"(expected 0..{len(found) - 1}): a rank did not finish saving")
    return [found[r] for r in range(len(found))]


def open_checkpoint(tag_dir: str) -> ZeroCheckpoint:
    """Parse one tag's metadata (no weights are read yet)."""
    model_file = os.path.join(tag_dir, MODEL_STATES)
    if not os.path.isfile(model_file):
        raise CheckpointError(f"{tag_dir}: {MODEL_STATES} missing")
    state = load_file(model_file)
    for key in ("module", "param_shapes", "buffer_names"):
        if key not in state:
            raise CheckpointError(f"{model_file}: no {key!r}: not a DeepSpeed model-state file")
    files = _optim_files(tag_dir)
    head = load_file(files[0])["optimizer_state_dict"]
    stage = int(getattr(head.get("zero_stage"), "value", head.get("zero_stage", -1)))
    if stage not in (1, 2):
        raise CheckpointError(f"{tag_dir}: ZeRO stage {stage}; this reader handles stages 1 and 2")
    counts = head.get("partition_count")
    world = max(counts) if isinstance(counts, list) else int(counts)
    if world != len(files):
        raise CheckpointError(f"{tag_dir}: saved by {world} ranks but {len(files)} partitions present")
    module = state["module"]
    client = {k: v for k, v in state.items() if k not in ("module", "optimizer", "param_shapes")}
    return ZeroCheckpoint(
        tag_dir=tag_dir, optim_files=files, param_shapes=list(state["param_shapes"]),
        buffers={k: module[k] for k in state["buffer_names"] if k in module},
        frozen=dict(state.get("frozen_param_fragments") or {}),
        shared=dict(state.get("shared_params") or {}),
        module_dtypes={k: v.dtype for k, v in module.items()},
        client_state=client, world_size=world)


@dataclass
class _Span:
    name: str
    start: int  # offset in the group's flat vector
    numel: int


def _group_spans(shapes: dict, paddings: list | None) -> tuple[list[_Span], int]:
    spans, offset = [], 0
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        spans.append(_Span(name, offset, n))
        offset += n + (paddings[i] if paddings else 0)
    return spans, offset


def read_fp32(ckpt: ZeroCheckpoint, keep: Callable[[str], bool] = lambda name: True,
              verify_module: bool = True) -> dict[str, torch.Tensor]:
    """The fp32 master weights (plus buffers/frozen/tied) of the names `keep` accepts."""
    out: dict[str, torch.Tensor] = {}
    written: dict[str, int] = {}
    plans = []
    for shapes in ckpt.param_shapes:
        for name, shape in shapes.items():
            if keep(name):
                out[name] = torch.empty(tuple(shape), dtype=torch.float32)
                written[name] = 0
    group_starts = None
    for rank, path in enumerate(ckpt.optim_files):
        osd = load_file(path)["optimizer_state_dict"]
        parts = osd["single_partition_of_fp32_groups"]
        if len(parts) != len(ckpt.param_shapes):
            raise CheckpointError(f"{path}: {len(parts)} param groups, model states have "
                                  f"{len(ckpt.param_shapes)}")
        if not plans:
            pads = osd.get("param_alignment_paddings") or [None] * len(parts)
            plans = [_group_spans(s, p) for s, p in zip(ckpt.param_shapes, pads)]
            group_starts = [0] * len(parts)
        for g, part in enumerate(parts):
            lo, hi = group_starts[g], group_starts[g] + part.numel()
            for span in plans[g][0]:
                a, b = max(lo, span.start), min(hi, span.start + span.numel)
                if a < b and span.name in out:
                    _copy_streaming(out[span.name].view(-1), a - span.start, part, a - lo, b - a)
                    written[span.name] += b - a
            group_starts[g] = hi
        del osd, parts  # drop the mapping before the next rank's file
    _check_layout(ckpt, plans, group_starts, out, written)
    for name, t in {**ckpt.buffers, **ckpt.frozen}.items():
        if keep(name):
            out[name] = t.float().clone() if t.is_floating_point() else t.clone()
    for alias, src in ckpt.shared.items():
        if keep(alias) and src in out:
            out[alias] = out[src]  # one tensor under both names: the tie survives torch.save
    if verify_module:
        _verify_against_module(ckpt, out)
    return out


def _copy_streaming(dst: torch.Tensor, dst_at: int, src: torch.Tensor, src_at: int, n: int) -> None:
    for i in range(0, n, _CHUNK):
        k = min(_CHUNK, n - i)
        piece = src[src_at + i:src_at + i + k]
        dst[dst_at + i:dst_at + i + k].copy_(piece)
        _drop_pages(piece)


def _check_layout(ckpt, plans, group_starts, out, written) -> None:
    align = 2 * ckpt.world_size  # ZeRO pads each flat group to a multiple of 2*world_size
    for g, ((_, consumed), avail) in enumerate(zip(plans, group_starts)):
        if align * math.ceil(consumed / align) != align * math.ceil(avail / align):
            raise CheckpointError(f"{ckpt.tag_dir}: param group {g} holds {avail} values, the "
                                  f"model states describe {consumed}: partitions do not match")
    short = [n for n, t in out.items() if written[n] != t.numel()]
    if short:
        raise CheckpointError(f"{ckpt.tag_dir}: {len(short)} parameters incompletely stored "
                              f"(e.g. {short[0]})")


def _verify_against_module(ckpt: ZeroCheckpoint, out: dict) -> None:
    """fp32 master rounded to the module dtype must equal the module weights DeepSpeed saved."""
    module = load_file(os.path.join(ckpt.tag_dir, MODEL_STATES))["module"]
    for name, t in out.items():
        ref = module.get(name)
        if ref is None or not ref.is_floating_point() or name in ckpt.shared:
            continue
        same = ref.shape == t.shape and torch.equal(t.to(ref.dtype), ref)
        _drop_pages(ref)
        if not same:
            raise CheckpointError(f"{ckpt.tag_dir}: fp32 master of {name} disagrees with the "
                                  f"saved {ref.dtype} module weights: offsets or files mixed up")
