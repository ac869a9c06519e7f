"""Stage 3: decode (simplejpeg), resize to the model's input size, light augmentation.

Images stay uint8 all the way to the model (which normalises inside its encoder): 4x less to pin
and copy than float32. JPEG decoding uses libjpeg-turbo's DCT-domain downscaling when the model
wants a smaller image than the shard holds (384 -> 128 decodes at 192 and resizes from there).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

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


def decode_image(data: bytes, size: int) -> np.ndarray:
    try:
        img = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=size, min_width=size)
    except (ValueError, RuntimeError) as e:  # simplejpeg raises ValueError on corrupt data
        raise SampleError(f"JPEG decode failed: {e}") from None
    img = img[:, :, 0]
    if img.shape != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return img


def decode_tokens(data: bytes, max_tokens: int) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SampleError(f"tokens.npy unreadable: {e}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "ui":
        raise SampleError(f"tokens.npy must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr[:max_tokens].astype(np.int64)


def _affine(size: int, rng: np.random.Generator, aug: AugmentSection) -> tuple:
    """PIL AFFINE coefficients (output -> input) for a random zoom/rotation/shift about the centre."""
    z = 1.0 + rng.uniform(-aug.scale, aug.scale)
    th = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    tx, ty = rng.uniform(-aug.translate, aug.translate, size=2) * size
    c, s, half = math.cos(th) / z, math.sin(th) / z, size / 2.0
    ox, oy = half + tx, half + ty
    return (c, s, half - c * ox - s * oy, -s, c, half + s * ox - c * oy)


def _tone(img: np.ndarray, rng: np.random.Generator, aug: AugmentSection) -> np.ndarray:
    """Brightness/contrast through a 256-entry lookup table (cheap on uint8)."""
    gain = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
    shift = rng.uniform(-aug.brightness, aug.brightness) * 255.0
    lut = np.clip((np.arange(256) - 127.5) * gain + 127.5 + shift, 0, 255).astype(np.uint8)
    return lut[img]


def augment(img: np.ndarray, rng: np.random.Generator, aug: AugmentSection) -> np.ndarray:
    size = img.shape[0]
    out = Image.fromarray(img).transform((size, size), Image.AFFINE, _affine(size, rng, aug),
                                         resample=Image.BILINEAR, fillcolor=0)
    return _tone(np.asarray(out), rng, aug)


def decode_sample(raw: dict, size: int, max_tokens: int, aug: AugmentSection | None,
                  rng: np.random.Generator | None) -> Decoded:
    img = decode_image(raw["jpg"], size)
    tokens = decode_tokens(raw["tokens.npy"], max_tokens)
    if aug is not None and aug.enabled and rng is not None:
        img = augment(img, rng, aug)
    return Decoded(raw["__key__"], np.ascontiguousarray(img), tokens)
