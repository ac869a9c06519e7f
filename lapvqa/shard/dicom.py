"""DICOM radiograph bytes -> 8-bit grayscale array as a viewer would display it.

Modality LUT (rescale), then the VOI LUT or window, then MONOCHROME1 (or a Presentation LUT
Shape INVERSE) inverted so bone is bright.
Real archives are less tidy than the standard's happy path, so this also takes:

* compressed transfer syntaxes (JPEG lossless, JPEG-LS, JPEG 2000, RLE, JPEG baseline/extended):
  pydicom hands them to GDCM (``python-gdcm``, a dependency) or its own RLE decoder;
* files without the 128-byte preamble and ``DICM`` marker (bare datasets from older PACS exports);
* a file meta header without a Transfer Syntax UID: for native (uncompressed) pixel data it is
  the encoding the dataset was read with, recorded as a warning; encapsulated data is rejected;
* colour (RGB / YBR / PALETTE COLOR) secondary captures of films: converted to luminance, with a
  warning.

Multi-frame images are rejected: which frame is "the" radiograph is not knowable here.
"""

from __future__ import annotations

import io

import numpy as np

from .images import ImageError, MissingCodecError, to_uint8

__all__ = ["decode_dicom"]

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as DICOM's YBR_FULL uses


def decode_dicom(data: bytes) -> tuple[np.ndarray, tuple[int, int], list[str]]:
    """(uint8 [H, W], (H, W) stored size, warnings); ImageError rejects the file,
    MissingCodecError stops the run (every file of that transfer syntax would fail)."""
    import pydicom

    warnings: list[str] = []
    ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    if "PixelData" not in ds:
        raise ImageError("image_unsupported", "DICOM without pixel data")
    frames = _int(ds.get("NumberOfFrames", 1))
    if frames != 1:  # checked before decoding: a cine loop can be large
        raise ImageError("image_unsupported", f"multi-frame DICOM ({frames} frames)")
    _ensure_transfer_syntax(ds, warnings)
    px = _pixels(ds, data)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
        px = _palette_to_rgb(ds, px)
    if px.ndim == 3 and px.shape[-1] == 3:  # pydicom gives RGB (YBR converted)
        warnings.append("dicom_color")
        return _luminance(px), (px.shape[0], px.shape[1]), warnings
    if px.ndim != 2:
        raise ImageError("image_unsupported", f"DICOM pixel array of shape {px.shape}")
    return _grayscale(ds, px, warnings), (px.shape[0], px.shape[1]), warnings


def _palette_to_rgb(ds, px: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        return apply_color_lut(px, ds)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise ImageError("image_unsupported", f"DICOM PALETTE COLOR without a usable LUT: {e}") from None


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """Colour (a scanned film, a screenshot) -> gray, stretched by its range as a grayscale DICOM
    without a window is (colour data carries no VOI)."""
    return to_uint8(rgb.astype(np.float32) @ _LUMA)


def _ensure_transfer_syntax(ds, warnings: list[str]) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    # native pixel data (a plain byte string, not encapsulated fragments) is decodable from the
    # encoding the reader found; compressed data without its syntax is not
    if ds["PixelData"].is_undefined_length:
        raise ImageError("image_unsupported", "compressed DICOM pixel data without a Transfer Syntax UID")
    implicit, little = ds.original_encoding
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    warnings.append("dicom_no_transfer_syntax")


def _pixels(ds, data: bytes) -> np.ndarray:
    from pydicom.uid import JPEGExtended12Bit

    ts = ds.file_meta.TransferSyntaxUID
    if ts == JPEGExtended12Bit and _int(ds.get("BitsStored", 8)) > 8:
        return _gdcm_file_pixels(data)
    try:
        return ds.pixel_array
    except NotImplementedError:  # a syntax pydicom has no decoder for at all: nothing to install
        raise ImageError("image_unsupported", f"DICOM transfer syntax {ts} is not supported") from None
    except RuntimeError as e:
        if "missing dependencies" in str(e):
            # every file of this syntax would fail: stop with pydicom's own list of what to install
            needs = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
            raise MissingCodecError(f"DICOM transfer syntax {ts} ({ts.name}) needs a pixel decoder "
                                    f"this environment lacks; pip install what pydicom lists: {needs}") from None
        raise


def _gdcm_file_pixels(data: bytes) -> np.ndarray:
    """12-bit lossy JPEG (Process 4), common in older CR archives: pydicom 3 declines it for GDCM
    (its in-memory frame path), but GDCM's own file reader decodes it, so read it that way."""
    import tempfile

    try:
        import gdcm
    except ImportError:
        raise MissingCodecError("12-bit JPEG Extended DICOM (1.2.840.10008.1.2.4.51) needs a "
                                "decoder: pip install python-gdcm") from None
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(data)
        f.flush()
        reader = gdcm.ImageReader()
        reader.SetFileName(f.name)
        if not reader.Read():
            raise ImageError("image_unreadable", "GDCM could not read the 12-bit JPEG DICOM")
        image = reader.GetImage()
        cols, rows = image.GetDimensions()[:2]
        dtype = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16,
                 "INT16": np.int16}.get(image.GetPixelFormat().GetScalarTypeAsString())
        samples = image.GetPixelFormat().GetSamplesPerPixel()
        if dtype is None or samples != 1:
            raise ImageError("image_unsupported", "12-bit JPEG DICOM with an unexpected pixel format")
        # python-gdcm hands the buffer back as str: surrogateescape restores the raw bytes
        buf = image.GetBuffer().encode("utf-8", "surrogateescape")
    px = np.frombuffer(buf, dtype)
    if px.size != rows * cols:
        raise ImageError("image_truncated", f"GDCM decoded {px.size} of {rows}x{cols} pixels")
    return px.reshape(rows, cols)


def _grayscale(ds, px: np.ndarray, warnings: list[str]) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    arr = apply_modality_lut(px, ds).astype(np.float32)
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    out = _voi(ds, arr) if has_voi else None
    if out is None:
        # no VOI, or an unusable one (width < 1, unreadable LUT, a window that misses the data):
        # the stored range is used, and the sample is counted
        warnings.append("dicom_window_ignored" if has_voi else "dicom_no_voi")
        out = to_uint8(arr)
    # MONOCHROME1 stores bone dark; a Presentation LUT Shape INVERSE (some CR vendors) flips the
    # display once more; both together cancel. Training data has bone bright.
    inverted = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        inverted = not inverted
        warnings.append("dicom_presentation_inverse")
    return 255 - out if inverted else out


def _voi(ds, arr: np.ndarray) -> np.ndarray | None:
    """The VOI LUT / window output as uint8, or None if the file's VOI cannot be used."""
    from pydicom.pixels import apply_voi_lut

    window = _linear_window(ds)
    if window is not None:
        c, w = window
        if not (np.isfinite(c) and np.isfinite(w) and w >= 1):  # PS3.3 C.11.2.1.2: width >= 1
            return None
        lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        p1, p99 = np.percentile(arr[::8, ::8], (1, 99))  # a subsample: cheap next to the decode
        if p99 < lo or p1 > hi:  # the window lies wholly outside the data (made for other
            return None          # data, e.g. a 12-bit window on 16-bit values): all black/white
        # DICOM PS3.3 C.11.2.1.2 linear window, mapped straight to 0..1 (not re-stretched, so
        # the window the radiologist's display would use is exactly what we keep)
        out = np.clip((arr - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0, 1) * 255
        return np.round(out).astype(np.uint8)
    try:  # VOI LUT sequence or a SIGMOID window: pydicom implements them
        return to_uint8(apply_voi_lut(arr, ds, index=0))
    except (ValueError, TypeError, IndexError, AttributeError, KeyError):
        return None


def _int(value) -> int:
    try:
        return int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


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
