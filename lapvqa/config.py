"""The training configuration: one typed dataclass per section, loaded from YAML + dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["--train.max_steps=50", "--run.dir", "runs/x"])
    cfg.train.max_steps           # 50, an int (overrides are parsed as YAML scalars, then type-checked)
    save_config(cfg, "runs/x/config.yaml")

Every key has a type and a default; an unknown key fails with the list of valid keys of its section
and a wrong type fails naming the key, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad config file or override; the message is one line that names the key."""


@dataclass
class RunSection:
    dir: str = "runs/default"  # everything the run writes goes here (checkpoints, metrics, tb/)
    resume: str = "auto"  # auto: continue from the newest COMPLETE checkpoint; never: refuse if any exist
    # true: also resume a checkpoint written by another number of ranks (weights and optimizer
    # state re-partitioned, data stream re-dealt, global batch kept); see docs/training.md
    elastic_resume: bool = False
    log_every_steps: int = 1  # one metrics.jsonl row (and TensorBoard point) every N steps
    tensorboard: bool = True  # local event files under run.dir/tb (nothing leaves the machine)
    progress: bool = True  # tqdm bar on rank 0
    log_sample_keys: bool = False  # audit trail: run.dir/keys/rank{R}.jsonl, sample keys per step
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: known GPUs only (CPU: null)


@dataclass
class DataSection:
    shards: str = ""  # the sharder's output folder or s3://bucket/prefix (holds manifest.json)
    train_split: str = "train"
    val_split: str = "validate"
    num_workers: int = 4  # DataLoader worker processes per rank (0 = decode in the training process)
    prefetch_factor: int = 4  # batches each worker keeps ready
    pin_memory: bool = True  # only used on CUDA
    shuffle_buffer: int = 2000  # samples (encoded bytes) in each stream's shuffle reservoir
    max_tokens: int = 254  # report tokens kept per sample (+2 EOTs must fit model.max_positions)
    max_errors: int = 100  # corrupt samples + unreadable shards tolerated per rank before failing
    max_empty_epochs: int = 3  # a stream whose whole epoch yields nothing this often in a row fails


@dataclass
class AugmentSection:
    # Light augmentation, drawn per sample by the data workers and applied batched on the device
    # (lapvqa.data.augment). Radiographs are never flipped: laterality is clinical information.
    enabled: bool = True
    scale: float = 0.08  # zoom in/out by up to this fraction (borders black, like the shards' padding)
    translate: float = 0.04  # shift by up to this fraction of the side
    rotate_deg: float = 5.0  # +- degrees
    brightness: float = 0.1  # add up to +-this (fraction of full scale)
    contrast: float = 0.1  # multiply contrast by 1 +- this


@dataclass
class ModelSection:
    preset: str = "card"  # lapvqa.pretrain.model.get_config name: card | tiny
    image_size: Optional[int] = None  # override the preset's input size (data is resized to it)
    overrides: dict = field(default_factory=dict)  # any other ModelConfig field, e.g. {dec_dropout: 0.0}
    pixel_stats_samples: int = 2048  # pixel_norm: pixel -> training images the maps are measured on


@dataclass
class TrainSection:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # samples per rank per forward/backward
    grad_accum_steps: int = 1
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100  # linear warm-up from 0
    weight_decay: float = 0.05  # not applied to biases, norms, embeddings
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clipping; 0 = off
    precision: str = "bf16"  # bf16 | fp32 | auto (bf16 on GPU, fp32 on CPU; bf16 also runs on CPU)
    zero_stage: int = 2
    max_nonfinite_in_row: int = 5  # abort after this many consecutive non-finite steps
    grad_checkpointing: bool = False  # recompute encoder/decoder activations in backward
    compile: bool = False  # regional torch.compile of each block (inductor: CUDA only, see below)
    # inductor on CUDA; aot_eager traces the same graphs (dynamo + AOTAutograd, eager kernels) and
    # runs anywhere: a cheap check that a config compiles under DeepSpeed before GPU time is spent
    compile_backend: str = "inductor"
    optimizer_impl: str = "torch"  # torch: torch AdamW (fused kernel on CUDA) | fused: DeepSpeed FusedAdam


@dataclass
class CheckpointSection:
    every_steps: int = 500
    keep_last: int = 3  # newest complete checkpoints kept; the best one is always kept on top
    save_final: bool = True
    save_on_signal: bool = True  # SIGTERM/SIGUSR1: save, then exit with code 75 (requeue)


@dataclass
class ValidateSection:
    every_steps: int = 500  # 0 = never (except at the end if at_end)
    micro_batch_size: Optional[int] = None  # None: train.micro_batch_size
    max_samples: int = 0  # 0 = the whole validate split; else the first N samples by shard order
    at_end: bool = True
    num_workers: int = 2


@dataclass
class DebugSection:
    # Fault injection for tests; the defaults do nothing.
    nan_steps: list = field(default_factory=list)  # steps whose loss is replaced by NaN
    step_sleep_s: float = 0.0  # slow each step down (to kill a run at a chosen moment)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validate: ValidateSection = field(default_factory=ValidateSection)
    debug: DebugSection = field(default_factory=DebugSection)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {("run", "resume"): ("auto", "never"), ("train", "precision"): ("bf16", "fp32", "auto"),
            ("train", "zero_stage"): (1, 2), ("train", "optimizer_impl"): ("torch", "fused"),
            ("train", "compile_backend"): ("inductor", "aot_eager")}


def _sections(obj) -> dict[str, type]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` checked against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, (list, tuple)),
          dict: lambda v: isinstance(v, dict)}[tp]
    if not ok(value):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else list(value) if tp is list else value


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    top = _sections(cfg)
    if parts[0] not in top:
        raise ConfigError(f"unknown key {key!r}; valid top-level keys: {', '.join(top)}")
    if not dataclasses.is_dataclass(top[parts[0]]):
        if len(parts) != 1:
            raise ConfigError(f"{parts[0]} is a plain value, not a section (got {key!r})")
        setattr(cfg, key, _coerce(key, value, top[key]))
        return
    section = getattr(cfg, parts[0])
    fields = _sections(section)
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(fields)}")
        for k, v in value.items():
            _apply(cfg, f"{key}.{k}", v)
        return
    name = parts[1]
    if name not in fields:
        raise ConfigError(f"unknown key {key!r}; valid keys in [{parts[0]}]: {', '.join(fields)}")
    if len(parts) > 2:  # model.overrides.dec_dropout=0.0: one entry of a dict-typed key
        if fields[name] is not dict:
            raise ConfigError(f"{parts[0]}.{name} is not a mapping (got {key!r})")
        getattr(section, name)[".".join(parts[2:])] = value
        return
    value = _coerce(key, value, fields[name])
    choices = _CHOICES.get((parts[0], name))
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    setattr(section, name, value)


def _check(cfg: Config) -> None:
    """Cross-field rules that a type cannot express."""
    positive = {"train.max_steps": cfg.train.max_steps, "train.micro_batch_size": cfg.train.micro_batch_size,
                "train.grad_accum_steps": cfg.train.grad_accum_steps, "train.lr": cfg.train.lr,
                "checkpoint.every_steps": cfg.checkpoint.every_steps, "run.log_every_steps": cfg.run.log_every_steps,
                "checkpoint.keep_last": cfg.checkpoint.keep_last, "data.max_tokens": cfg.data.max_tokens,
                "data.shuffle_buffer": cfg.data.shuffle_buffer}
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key} must be > 0, got {v}")
    for key, v in {"train.warmup_steps": cfg.train.warmup_steps, "data.num_workers": cfg.data.num_workers,
                   "validate.every_steps": cfg.validate.every_steps, "data.max_errors": cfg.data.max_errors,
                   "validate.max_samples": cfg.validate.max_samples}.items():
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if not cfg.data.shards:
        raise ConfigError("data.shards is required: the sharder's output folder or s3:// prefix")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio}")


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``--a.b=v`` / ``--a.b v`` -> [("a.b", yaml-parsed v)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"expected --section.key=value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw, i = arg[2:], args[i + 1], i + 1
        else:
            raise ConfigError(f"{arg}: missing value (use {arg}=VALUE)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
        i += 1
    return out


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None,
                *, check: bool = True) -> Config:
    """Defaults <- YAML file <- overrides, type-checked; raises ConfigError with a one-line message."""
    cfg = Config()
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for key, value in data.items():
            _apply(cfg, str(key), value)
    for key, value in parse_overrides(list(overrides or [])):
        _apply(cfg, key, value)
    if check:
        _check(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """The inverse of ``Config.to_dict`` (e.g. the resolved config stored in a checkpoint)."""
    cfg = Config()
    for key, value in d.items():
        _apply(cfg, key, value)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dump_config(cfg))
    os.replace(tmp, path)


def valid_keys() -> list[str]:
    """Every dotted key, for docs and error messages."""
    cfg, keys = Config(), []
    for name, tp in _sections(cfg).items():
        if dataclasses.is_dataclass(tp):
            keys += [f"{name}.{k}" for k in _sections(getattr(cfg, name))]
        else:
            keys.append(name)
    return keys
