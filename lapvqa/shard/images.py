"""Radiograph bytes -> square 8-bit grayscale JPEG of the configured size.

JPEG goes through simplejpeg (libjpeg-turbo) with DCT-domain downscaling: a 2500x3000 source
decodes directly at 1/2, 1/4 or 1/8 scale, skipping most of the IDCT work, which is where
the plain "decode full size, then resize" way spends its time. Other formats go through Pillow,
DICOM through pydicom and GDCM (lapvqa/shard/dicom.py: modality LUT, VOI LUT or window,
MONOCHROME1 inverted so bone is bright).
The whole radiograph is kept: the longer side is scaled to ``size`` and the shorter side padded
with black (the radiograph background), centred.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from .inputs import InputError

__all__ = ["ImageError", "MissingCodecError", "ProcessedImage", "process_image", "fit_size", "encode_gray_jpeg"]

Image.MAX_IMAGE_PIXELS = 200_000_000  # radiographs are big; still guard against bombs
# a DICOM without preamble/"DICM" starts with a tag of group 0002 (meta) or 0008 (identity),
# little-endian, element < 0x0100
_BARE_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00")
_RESAMPLE = Image.Resampling.BICUBIC  # antialiased in Pillow (support scales with the factor)


class MissingCodecError(InputError):
    """The environment cannot decode a whole class of inputs: stop the run instead of rejecting
    every image one by one."""


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is the rejects.jsonl reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class ProcessedImage:
    jpeg: bytes
    orig_size: tuple[int, int]  # (height, width) of the source
    source: str  # "jpeg", "png", "dicom", ... (what the bytes were, not the file name)
    warnings: list[str]


def fit_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) with the longer side = size and the aspect ratio kept."""
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _sniff(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[128:132] == b"DICM" or (data[:2] in _BARE_DICOM_GROUPS and data[3:4] == b"\x00"):
        return "dicom"
    return "other"


def _decode_jpeg(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    h, w, _cs, _sub = simplejpeg.decode_jpeg_header(data)
    th, tw = fit_size(h, w, size)
    # libjpeg picks the smallest DCT scale whose output is still >= (th, tw): no upsampling.
    arr = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=th, min_width=tw)
    return arr[:, :, 0], (h, w)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Stretch a >8-bit (or float) grayscale array to 0..255 by its own range."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _decode_pil(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = to_uint8(np.asarray(im))  # 12/16-bit PNG: use the full stored range
        else:
            arr = np.asarray(im.convert("L"))
    return arr, (arr.shape[0], arr.shape[1])


def _resize_pad(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape
    th, tw = fit_size(h, w, size)
    if (h, w) != (th, tw):
        # reducing_gap: integer box-reduce first, then a small exact antialiased step
        arr = np.asarray(Image.fromarray(arr).resize((tw, th), _RESAMPLE, reducing_gap=3.0))
    out = np.zeros((size, size), np.uint8)
    top, left = (size - th) // 2, (size - tw) // 2
    out[top:top + th, left:left + tw] = arr
    return out


def encode_gray_jpeg(arr: np.ndarray, quality: int) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(arr)[:, :, None], quality=quality,
                                  colorspace="GRAY")


def _decode_any(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int], str, list[str]]:
    kind = _sniff(data)
    if kind == "jpeg":
        try:
            arr, orig = _decode_jpeg(data, size)
            return arr, orig, kind, []
        except ValueError as e:
            # simplejpeg is strict (truncated data, 12-bit, arithmetic coding...): let Pillow try,
            # but a truncated file stays a reject: Pillow would silently grey-fill it.
            if "premature end" in str(e).lower() or "truncated" in str(e).lower():
                raise ImageError("image_truncated", str(e)[:200]) from None
            arr, orig = _decode_pil(data)
            return arr, orig, kind, ["image_pillow_fallback"]
    if kind == "dicom":
        from .dicom import decode_dicom  # pydicom is imported only for DICOM inputs

        arr, orig, warnings = decode_dicom(data)
        return arr, orig, kind, warnings
    arr, orig = _decode_pil(data)
    return arr, orig, (kind if kind != "other" else "pil"), []


def process_image(data: bytes, *, size: int = 384, quality: int = 95,
                  min_side: int = 128) -> ProcessedImage:
    """Decode, check, fit into ``size`` x ``size`` and encode; raises ImageError to reject."""
    if not data:
        raise ImageError("image_empty", "0 bytes")
    try:
        arr, orig, kind, warnings = _decode_any(data, size)
    except (ImageError, MissingCodecError):
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("image_unreadable", str(e)[:200]) from None
    except Image.UnidentifiedImageError:
        raise ImageError("image_unreadable", "not a recognised image format") from None
    except Exception as e:  # decoders raise many types; each is a counted reject, never a crash
        # no object addresses in the message: rejects.jsonl must be reproducible
        msg = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}").replace("\n", " ")[:200]
        reason = "image_truncated" if "truncat" in msg.lower() else "image_unreadable"
        raise ImageError(reason, msg) from None
    if min(orig) < min_side:
        raise ImageError("image_too_small", f"{orig[0]}x{orig[1]} < {min_side} px")
    if int(arr.max()) - int(arr.min()) < 8:  # before padding, which adds black
        raise ImageError("image_blank", f"pixel values {arr.min()}..{arr.max()}")
    out = _resize_pad(arr, size)
    return ProcessedImage(encode_gray_jpeg(out, quality), orig, kind, warnings)
