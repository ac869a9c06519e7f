"""Stage 3: decode (simplejpeg), resize to the model's input size, draw augmentation parameters.

Images stay uint8 all the way to the device (4x less to pin and copy than float32). JPEG decoding
uses libjpeg-turbo's DCT-domain downscaling when the model wants a smaller image than the shard
holds (384 -> 128 decodes at 192 and resizes from there). Augmentation is only *drawn* here; its
resampling runs batched on the device (lapvqa.data.augment), where it is nearly free, instead
of costing a CPU worker more than the JPEG decode itself (benchmarks/loader.py).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import simplejpeg
from PIL import Image

from lapvqa.config import AugmentSection


class SampleError(ValueError):
    """One sample that cannot be decoded; the caller counts it with the shard name."""


@dataclass
class Decoded:
    key: str
    image: np.ndarray  # uint8 [S, S]
    tokens: np.ndarray  # int64 [n] report tokens, no EOTs
    aug: Optional[np.ndarray] = None  # float32 [6] augmentation parameters (see augment_params)


def decode_jpeg(data: bytes, size: int) -> np.ndarray:
    """Grayscale uint8 [h, w], DCT-downscaled by libjpeg-turbo while still >= size."""
    try:
        img = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=size, min_width=size)
    except (ValueError, RuntimeError) as e:  # simplejpeg raises ValueError on corrupt data
        raise SampleError(f"JPEG decode failed: {e}") from None
    return img[:, :, 0]


def decode_image(data: bytes, size: int) -> np.ndarray:
    img = decode_jpeg(data, size)
    if img.shape != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return img


_NPY_1D = re.compile(r"'descr':\s*'([<>|]?[ui][1248])',\s*'fortran_order':\s*False,\s*'shape':\s*\((\d+),?\)")


def _read_npy(data: bytes) -> np.ndarray:
    """A 1-D integer .npy without np.load's literal_eval of the header (~0.1 ms per sample)."""
    if data[:6] == b"\x93NUMPY" and data[6] in (1, 2, 3):
        start = 10 if data[6] == 1 else 12
        hlen = int.from_bytes(data[8:start], "little")
        m = _NPY_1D.search(data[start:start + hlen].decode("latin1"))
        if m and start + hlen + int(m.group(2)) * np.dtype(m.group(1)).itemsize == len(data):
            return np.frombuffer(data, dtype=m.group(1), count=int(m.group(2)), offset=start + hlen)
    return np.load(io.BytesIO(data), allow_pickle=False)  # anything unusual: the full parser


def decode_tokens(data: bytes, max_tokens: int) -> np.ndarray:
    try:
        arr = _read_npy(data)
    except (ValueError, OSError, EOFError) as e:
        raise SampleError(f"tokens.npy unreadable: {e}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "ui":
        raise SampleError(f"tokens.npy must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr[:max_tokens].astype(np.int64)


def augment_params(rng: np.random.Generator, aug: AugmentSection) -> np.ndarray:
    """Per-sample augmentation, drawn here (seeded: resume-exact) and applied batched on the
    device by :func:`lapvqa.data.augment.apply_augment`: [zoom, shift_x, shift_y, degrees,
    contrast gain, brightness shift]."""
    return np.array([1.0 + rng.uniform(-aug.scale, aug.scale),
                     rng.uniform(-aug.translate, aug.translate), rng.uniform(-aug.translate, aug.translate),
                     rng.uniform(-aug.rotate_deg, aug.rotate_deg),
                     1.0 + rng.uniform(-aug.contrast, aug.contrast),
                     rng.uniform(-aug.brightness, aug.brightness)], dtype=np.float32)


def decode_sample(raw: dict, size: int, max_tokens: int, aug: AugmentSection | None,
                  rng: np.random.Generator | None) -> Decoded:
    tokens = decode_tokens(raw["tokens.npy"], max_tokens)
    img = decode_image(raw["jpg"], size)
    params = augment_params(rng, aug) if aug is not None and aug.enabled and rng is not None else None
    return Decoded(raw["__key__"], np.ascontiguousarray(img), tokens, params)
