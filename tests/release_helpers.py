"""Shared by the release/generate/probe tests: a release dir from a freshly initialised model."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from lapvqa.pretrain.model import CaptioningModel, get_config


def make_release(out_dir: str, preset: str = "tiny", seed: int = 0) -> CaptioningModel:
    """Write model_best.pt, encoder_final.pt and config.json the way consolidate lays them out."""
    torch.manual_seed(seed)
    config = get_config(preset)
    model = CaptioningModel(config).eval()
    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, "model_best.pt"))
    torch.save(model.vision_encoder.state_dict(), os.path.join(out_dir, "encoder_final.pt"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    return model
