"""Resume decisions without a launcher (the end-to-end runs are in test_train.py): the global
batch kept, a checkpoint DeepSpeed cannot convert, a changed worker count, damaged checkpoints."""

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


def test_every_resume_keeps_the_recorded_global_batch(tmp_path):
    """After 8 -> 4 ranks (accumulation doubled) the next requeue on 4 ranks reads the YAML's
    accumulation again: the marker's global batch still wins. Older markers: left as configured."""
    cfg = _cfg(micro_batch_size=16, grad_accum_steps=2)
    keep_global_batch(cfg, {"tag": "global_step80", "world_size": 4, "global_batch": 256}, 4, tmp_path,
                      elastic=False)
    assert cfg.train.grad_accum_steps == 4
    cfg = _cfg(micro_batch_size=16, grad_accum_steps=2)
    keep_global_batch(cfg, {"tag": "global_step80", "world_size": 4}, 4, tmp_path, elastic=False)
    assert cfg.train.grad_accum_steps == 2


def test_changed_worker_count_without_elastic_is_a_resume_error():
    import torch

    from lapvqa.train.dist import DistInfo
    from lapvqa.train.loop import Trainer
    state = {"version": 1, "world_size": 1, "workers": 2, "units": "x", "seed": 0, "next_worker": 0,
             "streams": {}}
    trainer = Trainer(_cfg(), DistInfo(0, 1, 0, torch.device("cpu"), "single"))
    trainer.cfg.data.num_workers = 3
    with pytest.raises(ResumeError, match="data.num_workers=2, this run has 3"):
        trainer._data_start({"data_state": {"world_size": 1, "ranks": [state]}})
    trainer.cfg.run.elastic_resume = True
    again = trainer._data_start({"data_state": {"world_size": 1, "ranks": [state]}})
    assert again["workers"] == 3 and again["units"] is None


def _fake_checkpoint(ckpt_dir: Path, step: int, val_loss: float, size: int = 10) -> Path:
    import json
    tag = ckpt_dir / f"global_step{step}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * size)
    (tag / "COMPLETE").write_text(json.dumps({"step": step, "tag": tag.name, "world_size": 1,
                                              "val_loss": val_loss,
                                              "files": {"mp_rank_00_model_states.pt": size}}))
    return tag


def test_damaged_checkpoints_set_aside_latest_and_best_follow_and_all_damaged_refuses(tmp_path):
    import json

    from lapvqa.train.checkpoint import Checkpoints
    ckpt = Checkpoints(tmp_path, 0, 1)
    _fake_checkpoint(ckpt.dir, 4, 2.0)
    newest = _fake_checkpoint(ckpt.dir, 8, 1.0)
    (ckpt.dir / "latest").write_text("global_step8\n")
    ckpt.reconcile_best()
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"x" * 4)  # truncated after saving
    assert ckpt.set_aside_damaged() == ["global_step8"]
    assert (ckpt.dir / "latest").read_text().strip() == "global_step4"
    ckpt.reconcile_best()  # as the trainer's start-up does next
    assert json.loads((ckpt.dir / "best.json").read_text())["tag"] == "global_step4"
    assert ckpt.resume_marker("auto", {})["tag"] == "global_step4"
    (ckpt.dir / "global_step4" / "mp_rank_00_model_states.pt").unlink()  # purged
    assert ckpt.set_aside_damaged() == ["global_step4"]
    ckpt.reconcile_best()
    assert not (ckpt.dir / "latest").exists() and not (ckpt.dir / "best.json").exists()
    with pytest.raises(ResumeError, match="every checkpoint in .* is damaged .*damaged-global_step4, "
                                          "damaged-global_step8"):
        ckpt.resume_marker("auto", {})
    from lapvqa.release.consolidate import inspect_run
    from lapvqa.release.artifacts import ReleaseError
    with pytest.raises(ReleaseError, match="no checkpoint has a COMPLETE marker"):
        inspect_run(str(tmp_path))
