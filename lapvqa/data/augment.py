"""Stage 5 (on the device): apply the per-sample augmentation drawn by the data workers.

One batched ``affine_grid`` + ``grid_sample`` (zoom, shift, small rotation; borders black like
the shards' padding) and a tone curve (contrast, brightness). The parameters come from the
seeded worker stream, so a resumed run applies exactly the same augmentation. Returns float
images in [0, 1], which the model's encoder accepts like uint8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def apply_augment(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """images uint8 [B, C, S, S], params [B, 6] = (zoom, shift_x, shift_y, degrees, gain, shift)."""
    x = images.float() / 255.0
    p = params.to(device=x.device, dtype=torch.float32)
    zoom, tx, ty = p[:, 0], p[:, 1], p[:, 2]
    th = p[:, 3] * (math.pi / 180.0)
    c, s = torch.cos(th) / zoom, torch.sin(th) / zoom
    # output -> input in normalised [-1, 1] coordinates; shifts are fractions of the side
    theta = torch.stack([torch.stack([c, s, 2 * tx], 1), torch.stack([-s, c, 2 * ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain, shift = p[:, 4].view(-1, 1, 1, 1), p[:, 5].view(-1, 1, 1, 1)
    return ((x - 0.5) * gain + 0.5 + shift).clamp_(0.0, 1.0)
