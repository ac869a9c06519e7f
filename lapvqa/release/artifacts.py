"""The released files and how every tool in the project loads them.

A release directory holds ``model_best.pt`` (full ``CaptioningModel`` state_dict),
``encoder_final.pt`` (``model.vision_encoder`` state_dict), ``config.json`` (``ModelConfig`` as a
dict), ``SHA256SUMS`` and ``MODEL_CARD.md``. Weights are plain dicts of tensors, always loaded with
``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch

MODEL_FILE = "model_best.pt"
ENCODER_FILE = "encoder_final.pt"
CONFIG_FILE = "config.json"
SUMS_FILE = "SHA256SUMS"
CARD_FILE = "MODEL_CARD.md"
ENCODER_PREFIX = "vision_encoder."


class ReleaseError(ValueError):
    """A release directory or run directory that cannot be used (one-line message for the CLI)."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_from_dict(data: dict):
    """ModelConfig from its asdict() form; unknown keys are refused (a newer or foreign config)."""
    from lapvqa.pretrain.model import ModelConfig

    try:
        return ModelConfig.from_dict(dict(data))
    except (TypeError, ValueError) as exc:
        raise ReleaseError(f"config.json: {exc}") from None


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def load_config(release_dir: str):
    path = os.path.join(release_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ReleaseError(f"{path} missing: not a lapvqa release directory")
    with open(path, encoding="utf-8") as f:
        return config_from_dict(json.load(f))


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ReleaseError(f"{path} missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(release_dir: str, device: str | torch.device = "cpu"):
    """CaptioningModel with model_best.pt, in eval mode."""
    from lapvqa.pretrain.model import CaptioningModel

    model = CaptioningModel(load_config(release_dir))
    model.load_state_dict(load_state_dict(os.path.join(release_dir, MODEL_FILE)))
    return model.to(device).eval()


def load_encoder(release_dir: str, which: str = "final", device: str | torch.device = "cpu"):
    """The frozen vision encoder: 'final' = encoder_final.pt, 'best' = model_best.pt's encoder."""
    from lapvqa.pretrain.model import VisionEncoder

    encoder = VisionEncoder(load_config(release_dir))  # every weight is overwritten below
    if which == "final":
        state = load_state_dict(os.path.join(release_dir, ENCODER_FILE))
    elif which == "best":
        full = load_state_dict(os.path.join(release_dir, MODEL_FILE))
        state = {k[len(ENCODER_PREFIX):]: v for k, v in full.items() if k.startswith(ENCODER_PREFIX)}
    else:
        raise ReleaseError(f"encoder {which!r}: expected final or best")
    encoder.load_state_dict(state)
    encoder.requires_grad_(False)
    return encoder.to(device).eval()


def weights_file(release_dir: str, which: str) -> str:
    return os.path.join(release_dir, ENCODER_FILE if which == "final" else MODEL_FILE)
