"""Typed config: YAML + dotted overrides, clear one-line errors, round trip, shipped configs load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lapvqa.config import Config, ConfigError, config_from_dict, dump_config, load_config, valid_keys

REPO = Path(__file__).resolve().parent.parent


def _yaml(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_required_keys_exist_with_their_names():
    keys = set(valid_keys())
    for k in ("run.dir", "data.shards", "model.preset", "train.max_steps", "train.micro_batch_size",
              "checkpoint.every_steps", "validate.every_steps", "seed"):
        assert k in keys


def test_yaml_then_overrides_typed(tmp_path):
    p = _yaml(tmp_path, {"data": {"shards": "/s"}, "train": {"max_steps": 10, "lr": 1}})
    cfg = load_config(p, ["--train.max_steps=20", "--run.dir", "runs/x", "--train.lr=5e-4",
                          "--debug.nan_steps=[3, 4]", "--model.overrides.dec_dropout=0.0", "--seed=7"])
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    assert cfg.run.dir == "runs/x" and cfg.seed == 7
    assert cfg.debug.nan_steps == [3, 4]
    assert cfg.model.overrides == {"dec_dropout": 0.0}
    # an int where a float is expected is fine (lr: 1 in YAML)
    assert isinstance(load_config(p).train.lr, float)


def test_unknown_key_lists_valid_ones(tmp_path):
    p = _yaml(tmp_path, {"data": {"shards": "/s"}, "train": {"max_step": 10}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.max_step" in msg and "max_steps" in msg and "micro_batch_size" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="valid top-level keys: run, data"):
        load_config(None, ["--trian.max_steps=3"])


@pytest.mark.parametrize("override, words", [
    ("--train.max_steps=abc", ["train.max_steps", "expected int", "'abc'"]),
    ("--train.max_steps=1.5", ["train.max_steps", "expected int"]),
    ("--run.tensorboard=maybe", ["run.tensorboard", "expected bool"]),
    ("--train.precision=fp8", ["train.precision", "bf16"]),
    ("--train.max_steps=0", ["train.max_steps", "> 0"]),
    ("--train.lr", ["missing value"]),
    ("train.lr=1", ["expected --section.key=value"]),
])
def test_bad_values_fail_clearly(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--data.shards=/s", override])
    for w in words:
        assert w in str(e.value)


def test_missing_shards_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="data.shards is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["--train.max_steps=7"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("name", ["tiny.yaml", "pretrain.yaml", "s3_example.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.zero_stage == 2


def test_cli_config_error_is_one_line(tmp_path):
    p = _yaml(tmp_path, {"data": {"shards": "/s"}, "validate": {"every_step": 3}})
    r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(p)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "validate.every_step" in err[0] and "every_steps" in err[0], r.stderr


def test_deepspeed_config_cpu_unchanged_and_cuda_tuned():
    """CPU keeps the settings every CPU test ran with; CUDA gets fewer, larger buckets, overlap
    only with >1 rank, and the chosen AdamW (no GPU needed: the dict is derived from the device)."""
    import torch
    from lapvqa.train.ds_config import deepspeed_config
    cfg = load_config(REPO / "configs" / "pretrain.yaml", ["--train.precision=bf16"])
    cpu = deepspeed_config(cfg, 2, torch.device("cpu"))
    assert cpu["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                        "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "fused" not in cpu["optimizer"]["params"]
    assert cpu["bf16"] == {"enabled": True, "check_grad_overflow": True}
    one, many = (deepspeed_config(cfg, n, torch.device("cuda")) for n in (1, 16))
    assert one["zero_optimization"]["overlap_comm"] is False and many["zero_optimization"]["overlap_comm"] is True
    assert many["zero_optimization"]["reduce_bucket_size"] == 2e8
    assert many["zero_optimization"]["allgather_bucket_size"] == 5e8
    assert many["optimizer"]["params"]["torch_adam"] is True and many["optimizer"]["params"]["fused"] is True
    cfg.train.optimizer_impl = "fused"
    assert deepspeed_config(cfg, 16, torch.device("cuda"))["optimizer"]["params"] == {
        **{k: v for k, v in many["optimizer"]["params"].items() if k != "fused"}, "torch_adam": False}
    assert deepspeed_config(cfg, 2, torch.device("cpu"))["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match="optimizer_impl"):
        load_config(REPO / "configs" / "tiny.yaml", ["--train.optimizer_impl=apex"])


def test_compile_is_ignored_on_cpu_with_inductor():
    from lapvqa.train.engine import maybe_compile
    import torch
    calls = []

    class Model:
        def compile_blocks(self, **kw):
            calls.append(kw["backend"])
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["--train.compile=true"])
    maybe_compile(cfg, Model(), torch.device("cpu"))
    assert calls == []
    maybe_compile(cfg, Model(), torch.device("cuda"))  # compile_blocks is lazy: no GPU needed
    assert calls == ["inductor"]
    cfg.train.compile_backend = "aot_eager"  # traces only: honoured on CPU too
    maybe_compile(cfg, Model(), torch.device("cpu"))
    assert calls == ["inductor", "aot_eager"]
    cfg.train.compile = False
    maybe_compile(cfg, Model(), torch.device("cuda"))
    assert calls == ["inductor", "aot_eager"]
    with pytest.raises(ConfigError, match="inductor, aot_eager"):
        load_config(REPO / "configs" / "tiny.yaml", ["--train.compile_backend=cudagraph"])
