"""Elastic resume's own pieces without a launcher (the end-to-end runs are in test_train.py):
the global batch it keeps, and a checkpoint DeepSpeed cannot convert."""

from __future__ import annotations

from pathlib import Path

import pytest

from lapvqa.config import load_config
from lapvqa.train.checkpoint import ResumeError
from lapvqa.train.elastic import _convert, keep_global_batch


def _cfg(**train):
    return load_config(None, ["--data.shards=shards"] + [f"--train.{k}={v}" for k, v in train.items()])


def test_global_batch_kept_or_refused_with_the_arithmetic(tmp_path):
    marker = {"tag": "global_step40", "world_size": 8, "global_batch": 256}
    cfg = _cfg(micro_batch_size=16, grad_accum_steps=2)
    keep_global_batch(cfg, marker, 4, tmp_path)  # 8 x 16 x 2 -> 4 x 16 x 4
    assert cfg.train.grad_accum_steps == 4
    cfg = _cfg(micro_batch_size=24)
    with pytest.raises(ResumeError, match="global batch of 256 on 8 ranks; 4 ranks x train.micro_batch_size=24"):
        keep_global_batch(cfg, marker, 4, tmp_path)
    # markers written before the global batch was recorded: the run's config.yaml tells it
    (tmp_path / "config.yaml").write_text("train:\n  micro_batch_size: 8\n  grad_accum_steps: 3\n")
    cfg = _cfg(micro_batch_size=8)
    keep_global_batch(cfg, {"tag": "global_step4", "world_size": 2}, 3, tmp_path)
    assert cfg.train.grad_accum_steps == 2  # 2 x 8 x 3 = 48 = 3 x 8 x 2
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ResumeError, match="does not record its global batch"):
        keep_global_batch(cfg, {"tag": "global_step4", "world_size": 2}, 3, tmp_path)


@pytest.mark.timeout(120)
def test_unconvertible_checkpoint_is_one_clear_error_and_leaves_nothing(tmp_path):
    src = tmp_path / "checkpoints" / "global_step4"
    src.mkdir(parents=True)
    (src / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    (src / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x00" * 100)
    dst = tmp_path / "checkpoints" / "universal" / "global_step4"
    error = _convert(src, dst)
    assert error and error.startswith(f"DeepSpeed could not convert {src} for an elastic resume (exit ")
    assert "\n" not in error and not dst.parent.exists()
