"""RUN_DIR (DeepSpeed ZeRO-2 checkpoints) -> RELEASE_DIR (the files users download).

Stages: inspect the run (COMPLETE markers, best.json) -> open both checkpoints and check them
against a fresh ``CaptioningModel(config)`` (names, shapes, strict load) -> stream the fp32 master
weights of the best tag -> write model_best.pt -> stream the encoder of the last complete tag ->
write encoder_final.pt -> config.json, optional safetensors, SHA256SUMS, MODEL_CARD.md. Everything
is written into a sibling temp folder that is renamed onto --out at the end, so --out is either
absent, or a complete release.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lapvqa.release import artifacts, card
from lapvqa.release.artifacts import ENCODER_PREFIX, ReleaseError
from lapvqa.release.zero import CheckpointError, ZeroCheckpoint, open_checkpoint, read_fp32
from lapvqa.train.checkpoint import TAG_RE, damage

log = logging.getLogger("lapvqa.consolidate")
_TAG_STEP = re.compile(r"global_step(\d+)$")


@dataclass
class ConsolidateConfig:
    run_dir: str
    out: str
    best_tag: str | None = None  # default: checkpoints/best.json
    safetensors: bool = False


@dataclass
class RunInfo:
    ckpt_dir: str
    best_tag: str
    best: dict  # best.json (tag, step, val_loss)
    last_tag: str
    last_step: int
    complete: dict = field(default_factory=dict)  # tag -> COMPLETE contents


def _complete_tags(ckpt_dir: str) -> dict[str, dict]:
    tags = {}
    for name in sorted(os.listdir(ckpt_dir)):
        if not TAG_RE.match(name):  # damaged-<tag>, universal/: never a release source
            continue
        marker = os.path.join(ckpt_dir, name, "COMPLETE")
        if os.path.isfile(marker):
            try:
                with open(marker, encoding="utf-8") as f:
                    tags[name] = json.load(f)
            except ValueError:
                raise ReleaseError(f"{marker}: not valid JSON") from None
    return tags


def _step_of(tag: str, meta: dict) -> int:
    if "step" in meta:
        return int(meta["step"])
    m = _TAG_STEP.search(tag)
    return int(m.group(1)) if m else -1


def inspect_run(run_dir: str, best_tag: str | None = None) -> RunInfo:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ReleaseError(f"{run_dir}: no checkpoints/ folder: not a lapvqa run dir")
    complete = _complete_tags(ckpt_dir)
    if not complete:
        raise ReleaseError(f"{ckpt_dir}: no checkpoint has a COMPLETE marker (training never "
                           "finished a save)")
    best = {"tag": best_tag}
    if best_tag is None:
        path = os.path.join(ckpt_dir, "best.json")
        if not os.path.isfile(path):
            raise ReleaseError(f"{path} missing (no validation ran, or its checkpoint was set aside "
                               "as damaged): pass --best-tag TAG")
        with open(path, encoding="utf-8") as f:
            best = json.load(f)
    if best.get("tag") not in complete:
        raise ReleaseError(f"best checkpoint {best.get('tag')!r} is missing or incomplete "
                           f"(no COMPLETE marker) in {ckpt_dir}")
    last_tag = max(complete, key=lambda t: _step_of(t, complete[t]))
    return RunInfo(ckpt_dir, best["tag"], best, last_tag, _step_of(last_tag, complete[last_tag]),
                   complete)


def _open_tag(info: RunInfo, tag: str) -> ZeroCheckpoint:
    problem = damage(Path(info.ckpt_dir) / tag, info.complete[tag])
    if problem:
        raise CheckpointError(f"{tag}: {problem} (damaged after it was saved; the trainer sets "
                              "such checkpoints aside when it resumes)")
    ckpt = open_checkpoint(os.path.join(info.ckpt_dir, tag))
    expected = info.complete[tag].get("world_size")
    if expected is not None and int(expected) != ckpt.world_size:
        raise CheckpointError(f"{tag}: COMPLETE says {expected} ranks, the files {ckpt.world_size}")
    return ckpt


def model_config_of(ckpt: ZeroCheckpoint):
    data = ckpt.client_state.get("model_config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{ckpt.tag_dir}: client_state has no model_config")
    return artifacts.config_from_dict(data)


def check_against_model(ckpt: ZeroCheckpoint, config) -> dict[str, tuple]:
    """Names and shapes must be exactly those of a fresh CaptioningModel(config)."""
    from lapvqa.pretrain.model import CaptioningModel

    with torch.device("meta"):
        fresh = CaptioningModel(config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = ckpt.names()
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(f"{ckpt.tag_dir} does not match CaptioningModel({config.name}): "
                              f"{len(missing)} missing (e.g. {missing[:2]}), "
                              f"{len(extra)} unexpected (e.g. {extra[:2]})")
    bad = [k for k in want if want[k] != have[k]]
    if bad:
        raise CheckpointError(f"{ckpt.tag_dir}: {bad[0]} has shape {have[bad[0]]}, the model "
                              f"{want[bad[0]]} ({len(bad)} mismatched)")
    return want


def _strict_load(state: dict, config, prefix: str = "") -> None:
    """Final proof: torch's own strict load on a meta-device model accepts the dict."""
    from lapvqa.pretrain.model import CaptioningModel, VisionEncoder

    with torch.device("meta"):
        module = VisionEncoder(config) if prefix else CaptioningModel(config)
    module.load_state_dict(state, strict=True, assign=True)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _prepare_out(out: str) -> str:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ReleaseError(f"--out {out} exists and is not empty: refusing to overwrite a release")
    tmp = f"{out.rstrip('/')}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def consolidate(cfg: ConsolidateConfig) -> dict:
    """Write the release; returns a summary (tags, sizes, peak RSS) for the CLI and tests."""
    info = inspect_run(cfg.run_dir, cfg.best_tag)
    best_ckpt, last_ckpt = _open_tag(info, info.best_tag), _open_tag(info, info.last_tag)
    config = model_config_of(best_ckpt)
    if artifacts.config_to_dict(model_config_of(last_ckpt)) != artifacts.config_to_dict(config):
        raise CheckpointError(f"{info.best_tag} and {info.last_tag} have different model configs")
    shapes = check_against_model(best_ckpt, config)
    check_against_model(last_ckpt, config)
    fp32_bytes = 4 * sum(torch.Size(s).numel() for s in shapes.values())
    tmp = _prepare_out(cfg.out)
    summary = {"best_tag": info.best_tag, "last_tag": info.last_tag, "fp32_gib": fp32_bytes / 2**30,
               "rss_start_gib": _rss_gib()}
    try:
        best = read_fp32(best_ckpt)
        _strict_load(best, config)
        _save(best, tmp, artifacts.MODEL_FILE, cfg.safetensors)
        del best  # before the encoder is read: one model's fp32 weights in RAM at a time
        enc = read_fp32(last_ckpt, keep=lambda n: n.startswith(ENCODER_PREFIX))
        enc = {k[len(ENCODER_PREFIX):]: v for k, v in enc.items()}
        _strict_load(enc, config, prefix=ENCODER_PREFIX)
        _save(enc, tmp, artifacts.ENCODER_FILE, cfg.safetensors)
        del enc
        with open(os.path.join(tmp, artifacts.CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(artifacts.config_to_dict(config), f, indent=2)
        sums = _write_sums(tmp)
        card.write_card(tmp, cfg.run_dir, info, best_ckpt, last_ckpt, config, sums)
        if os.path.isdir(cfg.out):
            os.rmdir(cfg.out)  # empty (checked above)
        os.replace(tmp, cfg.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["rss_peak_gib"] = _rss_gib()
    summary["files"] = sums
    return summary


def _save(state: dict, folder: str, name: str, with_safetensors: bool) -> None:
    torch.save(state, os.path.join(folder, name))
    if with_safetensors:
        from safetensors.torch import save_file

        unique, seen = {}, set()
        for k, v in state.items():  # safetensors refuses aliases: keep the first name of a tie
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v.contiguous()
        path = os.path.join(folder, name.replace(".pt", ".safetensors"))
        save_file(unique, path, metadata={"format": "pt"})
        os.chmod(path, 0o644)  # safetensors creates 0600; a release is meant to be shared


def _write_sums(folder: str) -> dict[str, str]:
    sums = {n: artifacts.sha256_file(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}
    with open(os.path.join(folder, artifacts.SUMS_FILE), "w", encoding="utf-8") as f:
        f.writelines(f"{h}  {n}\n" for n, h in sums.items())  # `sha256sum -c SHA256SUMS` format
    return sums
