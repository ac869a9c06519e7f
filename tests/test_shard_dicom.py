"""DICOM as archives really hold it: compressed transfer syntaxes (written by GDCM here, as a PACS
would), bare datasets without preamble, a missing Transfer Syntax UID, colour secondary
captures, multi-frame files and syntaxes nothing can decode."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import simplejpeg
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from lapvqa.shard.images import ImageError, process_image
from mimic_fixtures import COMPRESSED_SYNTAXES, compress_dicom, radiograph, relabelled_dicom, write_dicom

LOSSLESS = ("jpeg_lossless", "jpeg_ls", "jpeg2000_lossless", "rle")


def _gray(jpeg: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(jpeg, colorspace="GRAY")[:, :, 0].astype(np.float32)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A 12-bit MONOCHROME1 windowed radiograph, uncompressed, and what the sharder makes of it."""
    d = tmp_path_factory.mktemp("dcm")
    arr = 4095 - radiograph(330, 270, seed=7).astype(np.float32) / 255 * 4095
    write_dicom(d / "plain.dcm", arr, photometric="MONOCHROME1", window=(2048, 4096))
    out = process_image((d / "plain.dcm").read_bytes())
    assert out.warnings == [] and out.orig_size == (330, 270)
    return d, out


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_syntaxes_give_the_same_shard_image(plain, syntax):
    d, ref = plain
    compress_dicom(d / "plain.dcm", d / f"{syntax}.dcm", syntax)
    data = (d / f"{syntax}.dcm").read_bytes()
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID.is_compressed
    out = process_image(data)
    # lossless: the same stored values, so the very same 384-px JPEG, byte for byte
    assert out.jpeg == ref.jpeg and out.orig_size == ref.orig_size and out.warnings == []


def test_lossy_baseline_jpeg_decodes_close(tmp_path):
    arr = radiograph(330, 270, seed=2)
    write_dicom(tmp_path / "p.dcm", arr, bits=8, window=(128, 256))
    compress_dicom(tmp_path / "p.dcm", tmp_path / "c.dcm", "jpeg_baseline")
    ref = _gray(process_image((tmp_path / "p.dcm").read_bytes()).jpeg)
    out = _gray(process_image((tmp_path / "c.dcm").read_bytes()).jpeg)
    assert np.abs(out - ref).mean() < 2.0 and ref.std() > 30


def test_12bit_lossy_jpeg_extended(tmp_path):
    """Process 4 (12-bit lossy), common in older CR archives; pydicom 3 declines it for GDCM, the
    sharder reads it through GDCM's file reader. A genuine 12-bit stream (SOF1, precision 12) from
    libjpeg-turbo via imagecodecs; the decode must equal libjpeg-turbo's exactly."""
    import imagecodecs  # the [test] extra: the only pip encoder of 12-bit JPEG here
    arr = (radiograph(330, 270, seed=2).astype(np.float32) / 255 * 4095).astype(np.uint16)
    stream = imagecodecs.jpeg8_encode(arr, level=90, bitspersample=12)
    sof = stream.find(b"\xff\xc1")
    assert sof > 0 and stream[sof + 4] == 12
    write_dicom(tmp_path / "p.dcm", imagecodecs.jpeg8_decode(stream), window=(2048, 4096))
    ds = pydicom.dcmread(tmp_path / "p.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.51"
    ds.PixelData = encapsulate([stream])
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    ref = process_image((tmp_path / "p.dcm").read_bytes())  # the decoded values, uncompressed
    out = process_image((tmp_path / "c.dcm").read_bytes())
    assert out.jpeg == ref.jpeg and out.warnings == []


def test_presentation_lut_inverse_flips_the_display(plain, tmp_path):
    d, ref = plain  # plain is MONOCHROME1: bone stored dark
    ds = pydicom.dcmread(d / "plain.dcm")
    ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME2", "INVERSE"
    ds.save_as(tmp_path / "inv.dcm", enforce_file_format=True)  # the same display, said another way
    out = process_image((tmp_path / "inv.dcm").read_bytes())
    assert out.jpeg == ref.jpeg and out.warnings == ["dicom_presentation_inverse"]
    ds.PhotometricInterpretation = "MONOCHROME1"  # both: the inversions cancel, bone dark again
    ds.save_as(tmp_path / "both.dcm", enforce_file_format=True)
    both = _gray(process_image((tmp_path / "both.dcm").read_bytes()).jpeg)
    assert np.corrcoef(both[:, 60:-60].ravel(), _gray(ref.jpeg)[:, 60:-60].ravel())[0, 1] < -0.9


def test_unusable_window_falls_back_to_the_stored_range(plain, tmp_path):
    d, _ = plain
    base = radiograph(330, 270, seed=7).astype(np.float32) / 255 * 4095
    write_dicom(tmp_path / "none.dcm", base)  # no window at all: the stored range
    ref = process_image((tmp_path / "none.dcm").read_bytes())
    assert ref.warnings == ["dicom_no_voi"]
    # a window for other data (all values below it: all black), and a width of 0 (invalid)
    for i, window in enumerate([(30000, 2000), (2048, 0)]):
        write_dicom(tmp_path / f"w{i}.dcm", base, window=window)
        out = process_image((tmp_path / f"w{i}.dcm").read_bytes())
        assert out.jpeg == ref.jpeg and out.warnings == ["dicom_window_ignored"], window
    # a window that overlaps the data is the radiologist's: kept even if it saturates a lot
    write_dicom(tmp_path / "narrow.dcm", base, window=(3200, 100))
    out = process_image((tmp_path / "narrow.dcm").read_bytes())
    assert out.warnings == [] and out.jpeg != ref.jpeg
    # a flat image stays a blank reject: its window covers it, nothing is stretched
    flat = np.full((330, 270), 2000.0) + np.random.default_rng(0).integers(0, 3, (330, 270))
    write_dicom(tmp_path / "flat.dcm", flat, window=(2048, 4096))
    with pytest.raises(ImageError) as e:
        process_image((tmp_path / "flat.dcm").read_bytes())
    assert e.value.reason == "image_blank"


def _bare(ds, *, implicit: bool, with_meta: bool) -> bytes:
    """The dataset without preamble/DICM, optionally led by its group-0002 meta elements."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    if with_meta:
        write_file_meta_info(fp, ds.file_meta, enforce_standard=False)
    write_dataset(fp, ds)
    return fp.getvalue()


def test_bare_datasets_and_missing_transfer_syntax(plain):
    d, ref = plain
    ds = pydicom.dcmread(d / "plain.dcm")
    for data, warn in [(_bare(ds, implicit=True, with_meta=False), ["dicom_no_transfer_syntax"]),
                       (_bare(ds, implicit=False, with_meta=True), [])]:
        assert data[128:132] != b"DICM"
        out = process_image(data)
        assert out.jpeg == ref.jpeg and out.source == "dicom" and out.warnings == warn
    del ds.file_meta.TransferSyntaxUID  # a meta header that forgot it: read as found
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    out = process_image(buf.getvalue())
    assert out.jpeg == ref.jpeg and out.warnings == ["dicom_no_transfer_syntax"]
    # compressed pixel data without its syntax cannot be guessed: a clear reject
    compress_dicom(d / "plain.dcm", d / "nots.dcm", "jpeg_lossless")
    ds = pydicom.dcmread(d / "nots.dcm")
    del ds.file_meta.TransferSyntaxUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    with pytest.raises(ImageError) as e:
        process_image(buf.getvalue())
    assert e.value.reason == "image_unsupported" and "Transfer Syntax" in e.value.detail


def test_colour_capture_to_luminance_and_multiframe_rejected(plain, tmp_path):
    d, _ = plain
    gray = radiograph(330, 270, seed=4)
    write_dicom(tmp_path / "g.dcm", gray, bits=8, window=(128, 256))
    ds = pydicom.dcmread(tmp_path / "g.dcm")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    del ds.WindowCenter, ds.WindowWidth
    ds.PixelData = np.repeat(gray[:, :, None], 3, axis=2).tobytes()  # a scanned film, in RGB
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    out = process_image((tmp_path / "rgb.dcm").read_bytes())
    assert out.warnings == ["dicom_color"] and out.orig_size == (330, 270)
    ds.PixelData = gray.tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    del ds.PlanarConfiguration
    ds.save_as(tmp_path / "g8.dcm", enforce_file_format=True)
    ref = process_image((tmp_path / "g8.dcm").read_bytes())  # the same film stored as gray
    assert np.abs(_gray(out.jpeg) - _gray(ref.jpeg)).max() <= 2
    # the same film as PALETTE COLOR, with an inverting gray palette: the palette must be applied
    pal = pydicom.dcmread(tmp_path / "g8.dcm")
    pal.PhotometricInterpretation = "PALETTE COLOR"
    for c in ("Red", "Green", "Blue"):
        setattr(pal, f"{c}PaletteColorLookupTableDescriptor", [256, 0, 16])
        pal[f"{c}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(pal, f"{c}PaletteColorLookupTableData", ((255 - np.arange(256, dtype=np.uint16)) * 257).tobytes())
    pal.save_as(tmp_path / "pal.dcm", enforce_file_format=True)
    out = process_image((tmp_path / "pal.dcm").read_bytes())
    assert out.warnings == ["dicom_color"]
    inner = (slice(None), slice(40, -40))  # inside the padding columns
    assert np.abs(_gray(out.jpeg)[inner] - (255 - _gray(ref.jpeg)[inner])).mean() < 1.5  # q95 JPEG
    del pal.RedPaletteColorLookupTableData  # a palette without its table: a clear reject
    pal.save_as(tmp_path / "pal2.dcm", enforce_file_format=True)
    with pytest.raises(ImageError) as e:
        process_image((tmp_path / "pal2.dcm").read_bytes())
    assert e.value.reason == "image_unsupported" and "PALETTE" in e.value.detail
    ds = pydicom.dcmread(d / "plain.dcm")
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    with pytest.raises(ImageError) as e:
        process_image((tmp_path / "mf.dcm").read_bytes())
    assert e.value.reason == "image_unsupported" and "multi-frame" in e.value.detail


def test_syntax_without_any_decoder_is_a_reject(plain):
    d, _ = plain
    with pytest.raises(ImageError) as e:  # JPEG XL: pydicom has no decoder at all (nothing to install)
        process_image(relabelled_dicom(d / "plain.dcm", "1.2.840.10008.1.2.4.110"))
    assert e.value.reason == "image_unsupported" and "1.2.840.10008.1.2.4.110" in e.value.detail


def test_every_fixture_syntax_is_decodable_here():
    from pydicom.pixels import get_decoder
    from pydicom import uid as U

    uids = {"jpeg_lossless": U.JPEGLosslessSV1, "jpeg_ls": U.JPEGLSLossless,
            "jpeg2000_lossless": U.JPEG2000Lossless, "rle": U.RLELossless,
            "jpeg_baseline": U.JPEGBaseline8Bit}
    assert set(uids) == set(COMPRESSED_SYNTAXES)
    missing = [name for name, u in uids.items() if not get_decoder(u).is_available]
    assert not missing, f"no pixel decoder for {missing}: is python-gdcm installed?"
