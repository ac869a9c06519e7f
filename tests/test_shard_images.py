"""Image path of the sharder: JPEG (DCT-scaled), 16-bit PNG, DICOM MONOCHROME1/2 + windows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from lapvqa.shard.images import ImageError, fit_size, process_image
from mimic_fixtures import radiograph, write_dicom


def _gray(jpeg: bytes) -> np.ndarray:
    h, w, cs, _ = simplejpeg.decode_jpeg_header(jpeg)
    assert (h, w) == (384, 384) and cs.lower() == "gray"
    return simplejpeg.decode_jpeg(jpeg, colorspace="GRAY")[:, :, 0].astype(np.float32)


def _jpeg(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def test_large_jpeg_scaled_padded_and_matches_full_decode():
    src = radiograph(2400, 1800, seed=3)
    out = process_image(_jpeg(src))
    img = _gray(out.jpeg)
    assert out.orig_size == (2400, 1800) and out.source == "jpeg"
    assert fit_size(2400, 1800, 384) == (384, 288)
    pad = (384 - 288) // 2
    assert img[:, : pad - 2].max() < 8 and img[:, -pad + 2:].max() < 8  # black side padding
    # The DCT-scaled path must match the slow exact path (full decode + LANCZOS) closely.
    ref = np.asarray(Image.fromarray(src).resize((288, 384), Image.Resampling.LANCZOS), np.float32)
    assert np.abs(img[:, pad:pad + 288] - ref).mean() < 4.0


def test_rgb_progressive_jpeg_and_16bit_png():
    rgb = np.repeat(radiograph(500, 400, seed=1)[:, :, None], 3, axis=2)
    assert process_image(_jpeg(rgb, progressive=True)).orig_size == (500, 400)
    arr16 = (radiograph(400, 500).astype(np.uint16) * 16)  # 12-bit values in a 16-bit PNG
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, "PNG")
    out = process_image(buf.getvalue())
    img = _gray(out.jpeg)
    assert out.source == "png" and img.max() > 200  # stretched, not left at 1/16 brightness


@pytest.mark.parametrize("data,reason", [
    (b"", "image_empty"),
    (b"not an image at all" * 10, "image_unreadable"),
])
def test_bad_bytes_rejected(data, reason):
    with pytest.raises(ImageError) as e:
        process_image(data)
    assert e.value.reason == reason


def test_truncated_small_and_blank_rejected():
    data = _jpeg(radiograph(600, 500))
    for bad, reason in [(data[: len(data) // 2], "image_truncated"),
                        (_jpeg(radiograph(60, 90)), "image_too_small"),
                        (_jpeg(np.full((400, 400), 77, np.uint8)), "image_blank")]:
        with pytest.raises(ImageError) as e:
            process_image(bad)
        assert e.value.reason == reason


def test_dicom_monochrome1_inverted_and_window_applied(tmp_path):
    base = radiograph(420, 360, seed=5).astype(np.float32) / 255 * 4095
    write_dicom(tmp_path / "m2.dcm", base, photometric="MONOCHROME2", window=(2048, 4096))
    write_dicom(tmp_path / "m1.dcm", 4095 - base, photometric="MONOCHROME1", window=(2048, 4096))
    m2 = _gray(process_image((tmp_path / "m2.dcm").read_bytes()).jpeg)
    m1 = _gray(process_image((tmp_path / "m1.dcm").read_bytes()).jpeg)
    # Same anatomy either way: bone/body bright, background dark.
    assert np.abs(m1 - m2)[:, 40:-40].mean() < 3.0
    assert m2[192, 192] > 100 and m2[5, 192] < 60
    # A narrow window saturates: values above it go white, below it black.
    write_dicom(tmp_path / "w.dcm", base, photometric="MONOCHROME2", window=(1500, 200))
    w = _gray(process_image((tmp_path / "w.dcm").read_bytes()).jpeg)
    inner = w[:, 40:-40]
    assert ((inner < 15) | (inner > 240)).mean() > 0.8
    # 16-bit without any window: the stored range is used (and flagged).
    write_dicom(tmp_path / "n.dcm", base * 16, photometric="MONOCHROME2", bits=16)
    out = process_image((tmp_path / "n.dcm").read_bytes())
    assert out.warnings == ["dicom_no_voi"]
    assert np.corrcoef(_gray(out.jpeg)[:, 40:-40].ravel(), m2[:, 40:-40].ravel())[0, 1] > 0.98
