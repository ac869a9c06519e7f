"""Stage 4: dynamic padding. Tokens are EOT + report + EOT, right-padded to the batch's longest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from lapvqa.tokenizer import EOT


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 1, S, S]
    tokens: torch.Tensor  # int64 [B, T]
    mask: torch.Tensor  # bool [B, T], True on real positions (both EOTs included)
    keys: list[str]
    meta: dict = field(default_factory=dict)  # stream position and error counts (see stream.py)
    aug: Optional[torch.Tensor] = None  # float32 [B, 6] augmentation parameters, or None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_target_tokens(self) -> int:
        return int(self.mask[:, 1:].sum())

    def pin_memory(self) -> "Batch":  # called by the DataLoader's pinning thread
        return Batch(self.images.pin_memory(), self.tokens.pin_memory(), self.mask.pin_memory(),
                     self.keys, self.meta, None if self.aug is None else self.aug.pin_memory())

    def to(self, device) -> "Batch":
        nb = torch.device(device).type == "cuda"
        return Batch(self.images.to(device, non_blocking=nb), self.tokens.to(device, non_blocking=nb),
                     self.mask.to(device, non_blocking=nb), self.keys, self.meta,
                     None if self.aug is None else self.aug.to(device, non_blocking=nb))


def collate(samples: list, meta: dict | None = None, image_size: int = 0) -> Batch:
    """Decoded samples -> Batch, padded to the longest report in this batch only."""
    if not samples:
        return Batch(torch.zeros(0, 1, image_size, image_size, dtype=torch.uint8),
                     torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.bool),
                     [], dict(meta or {}))
    longest = max(len(s.tokens) for s in samples) + 2
    tokens = np.full((len(samples), longest), EOT, dtype=np.int64)
    mask = np.zeros((len(samples), longest), dtype=bool)
    for i, s in enumerate(samples):
        n = len(s.tokens)
        tokens[i, 1:n + 1] = s.tokens
        mask[i, :n + 2] = True
    images = torch.from_numpy(np.stack([s.image for s in samples])[:, None])
    aug = None
    if samples[0].aug is not None:
        aug = torch.from_numpy(np.stack([s.aug for s in samples]))
    return Batch(images, torch.from_numpy(tokens), torch.from_numpy(mask),
                 [s.key for s in samples], dict(meta or {}), aug)
