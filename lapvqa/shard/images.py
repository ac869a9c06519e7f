"""Radiograph bytes -> square 8-bit grayscale JPEG of the configured size.

JPEG goes through simplejpeg (libjpeg-turbo) with DCT-domain downscaling: a 2500x3000 source
decodes directly at 1/2, 1/4 or 1/8 scale, skipping most of the IDCT work, which is where
the plain "decode full size, then resize" way spends its time. Other formats go through Pillow,
DICOM through pydicom (modality LUT, VOI LUT or window, MONOCHROME1 inverted so bone is bright).
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
    if data[128:132] == b"DICM":
        return "dicom"
    return "other"


def _decode_jpeg(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    h, w, _cs, _sub = simplejpeg.decode_jpeg_header(data)
    th, tw = fit_size(h, w, size)
    # libjpeg picks the smallest DCT scale whose output is still >= (th, tw): no upsampling.
    arr = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=th, min_width=tw)
    return arr[:, :, 0], (h, w)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
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
            arr = _to_uint8(np.asarray(im))  # 12/16-bit PNG: use the full stored range
        else:
            arr = np.asarray(im.convert("L"))
    return arr, (arr.shape[0], arr.shape[1])


def _decode_dicom(data: bytes) -> tuple[np.ndarray, tuple[int, int], list[str]]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data))
    try:
        px = ds.pixel_array
    except RuntimeError as e:
        if "missing dependencies" in str(e):
            ts = ds.file_meta.get("TransferSyntaxUID", "?")
            raise MissingCodecError(
                f"DICOM transfer syntax {ts} needs a pixel decoder: pip install "
                "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)") from None
        raise
    if px.ndim != 2:
        raise ImageError("image_unsupported", f"DICOM pixel array of shape {px.shape}")
    warnings = []
    arr = apply_modality_lut(px, ds).astype(np.float32)
    window = _linear_window(ds)
    if window is not None:
        # DICOM PS3.3 C.11.2.1.2 linear window, mapped straight to 0..1 (not re-stretched, so
        # the window the radiologist's display would use is exactly what we keep)
        c, w = window
        out = np.round(np.clip((arr - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0, 1) * 255)
        out = out.astype(np.uint8)
    elif "VOILUTSequence" in ds or "WindowCenter" in ds:  # LUT or SIGMOID: pydicom does it
        out = _to_uint8(apply_voi_lut(arr, ds, index=0))
    else:
        warnings.append("dicom_no_voi")  # no window given: the stored range is used
        out = _to_uint8(arr)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1 stores bone dark; training data has bone bright
    return out, (px.shape[0], px.shape[1]), warnings


def _first(value) -> float:
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _linear_window(ds) -> tuple[float, float] | None:
    if "VOILUTSequence" in ds or "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    if str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() not in ("", "LINEAR"):
        return None
    try:
        return _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None


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
        arr, orig, warnings = _decode_dicom(data)
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
