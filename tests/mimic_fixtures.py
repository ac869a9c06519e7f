"""Small MIMIC-CXR-shaped trees with real image files, for tests (importable by any test).

    tree = write_mimic_jpg_tree(tmp_path / "jpg", n_studies=6, faults=ALL_FAULTS)
    tree.images_root, tree.reports_dir          # pass to python -m lapvqa.shard
    tree.expected_samples                       # {dicom_id: record} that must end up in shards
    tree.expected_rejects                       # {dicom_id: reason}

Layout follows PhysioNet: ``files/p1X/p1XXXXXXX/sYYYYYYYY/<dicom_id>.jpg``, gzip'd
``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv.gz``, reports in
``files/p1X/p1XXXXXXX/sYYYYYYYY.txt`` (optionally also zipped as ``mimic-cxr-reports.zip``).
"""

from __future__ import annotations

import csv
import gzip
import io
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["MimicTree", "write_mimic_jpg_tree", "write_mimic_dicom_tree", "radiograph",
           "REPORTS", "ALL_FAULTS", "write_dicom", "compress_dicom", "COMPRESSED_SYNTAXES", "HTJ2K", "relabelled_dicom", "htj2k_decodable", "CHEXPERT"]

CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
            "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
            "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]

# Tricky but valid reports (bytes): banner + sections, WET READ preamble, CRLF + hard wraps,
# no FINDINGS, free text only, odd header case, ___ placeholders, a cp1252 byte.
REPORTS = [
    b"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
    b" INDICATION:  ___F with cough\n \n TECHNIQUE:  Chest PA and lateral\n \n"
    b" COMPARISON:  None.\n \n FINDINGS: \n \n There is no focal consolidation, pleural effusion"
    b" or\n pneumothorax.  The cardiomediastinal silhouette is normal.\n \n IMPRESSION: \n \n"
    b" No acute cardiopulmonary process.\n",
    b"WET READ: ___ ___ 10:15 AM\n  No pneumothorax.\n\n                 FINAL REPORT\r\n"
    b" HISTORY:  Chest pain.\r\n\r\n FINDINGS:  Heart size is mildly enlarged.  There is\r\n"
    b" mild pulmonary vascular congestion.\r\n\r\n IMPRESSION:\r\n 1. Mild cardiomegaly.\r\n"
    b" 2. Mild vascular congestion.\r\n",
    b"                                 FINAL REPORT\n EXAMINATION:  CHEST (PORTABLE AP)\n\n"
    b" INDICATION:  Intubated patient.\n\n IMPRESSION:  Endotracheal tube terminates 4 cm\n"
    b" above the carina.  Lungs are clear.\n",
    b"PA and lateral views of the chest were obtained. The lungs are well expanded and\n"
    b"clear. There is no effusion. The heart is normal in size.\n",
    b"                                 FINAL REPORT\n Findings: Lungs clear, no effusion.\n"
    b" Impression: Normal chest radiograph, patient\x92s lungs clear.\n",
]
ALL_FAULTS = ("truncated_jpeg", "corrupt_image", "empty_image", "missing_image", "tiny_image",
              "blank_image", "missing_report", "empty_report", "binary_report", "no_split",
              "unsafe_id", "patient_two_splits", "duplicate_dicom_id", "bad_subject_id")
_FAULT_REASON = {
    "truncated_jpeg": "image_truncated", "corrupt_image": "image_unreadable",
    "empty_image": "image_empty", "missing_image": "image_missing", "tiny_image": "image_too_small",
    "blank_image": "image_blank", "missing_report": "report_missing",
    "empty_report": "report_empty", "binary_report": "report_undecodable",
    "no_split": "no_split", "unsafe_id": "unsafe_id", "patient_two_splits": "patient_in_two_splits",
    "duplicate_dicom_id": "duplicate_dicom_id", "bad_subject_id": "bad_id",
}


@dataclass
class MimicTree:
    images_root: Path
    reports_dir: Path
    reports_zip: Path | None = None
    metadata_dir: Path | None = None  # where the JPG CSVs are (DICOM trees: may be separate)
    expected_samples: dict = field(default_factory=dict)  # dicom_id -> dict(subject,study,split,view,kind)
    expected_rejects: dict = field(default_factory=dict)  # dicom_id -> reason
    reports: dict = field(default_factory=dict)  # study_id -> report bytes


def radiograph(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A chest-X-ray-ish uint8 image: dark background, bright body ellipse, lungs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2, w / 2
    body = ((yy - cy) / (0.45 * h)) ** 2 + ((xx - cx) / (0.42 * w)) ** 2 < 1
    img = np.where(body, 170.0, 20.0)
    for side in (-1, 1):
        lung = ((yy - cy * 0.95) / (0.3 * h)) ** 2 + ((xx - cx - side * 0.18 * w) / (0.13 * w)) ** 2 < 1
        img = np.where(lung, 70.0, img)
    img += rng.normal(0, 12, (h, w)) + 20 * np.sin(xx / (7 + seed % 5))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16) * 16, mode=None).save(buf, "PNG")  # 12-bit in 16-bit
    return buf.getvalue()


def _write_gz_csv(path: Path, header: list[str], rows: list[list], gz: bool = True) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)


def _dicom_id(rng: random.Random) -> str:
    return "-".join(f"{rng.getrandbits(32):08x}" for _ in range(5))


def _study_dir(root: Path, subject: int, study: int) -> Path:
    return root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"


def _split_of(i: int) -> str:
    return ("train", "validate", "train", "test")[i % 4]


def _plan_rows(n_studies: int, images_per_study: int, faults, rng: random.Random) -> list[dict]:
    """Image rows: normal ones first, then one extra study per planted fault."""
    rows = []
    for s in range(n_studies):
        subject, study = 10000000 + s // 2, 50000000 + s
        for k in range(images_per_study):
            rows.append(dict(subject=subject, study=study, dicom=_dicom_id(rng),
                             split=_split_of(s // 2), view="PA" if k % 2 == 0 else "LATERAL",
                             report=REPORTS[s % len(REPORTS)], fault=None))
    for j, fault in enumerate(faults):
        subject, study = 19000000 + j, 59000000 + j
        rows.append(dict(subject=subject, study=study, dicom=_dicom_id(rng), split="train",
                         view="AP", report=REPORTS[0], fault=fault))
    return rows


def _apply_row_faults(rows: list[dict]) -> list[dict]:
    extra = []
    for r in rows:
        f = r["fault"]
        if f == "unsafe_id":
            r["dicom"] = "../evil.id"
        elif f == "no_split":
            r["split"] = None
        elif f == "bad_subject_id":
            r["subject_csv"] = "not-a-number"
        elif f == "patient_two_splits":  # same patient, second image in test
            extra.append(dict(r, dicom=r["dicom"][:-2] + "zz", split="test", study=r["study"] + 500,
                              fault="patient_two_splits"))
        elif f == "duplicate_dicom_id":  # the row itself is fine; a copy is the reject
            extra.append(dict(r, study=r["study"] + 700, fault="duplicate_dicom_id_copy"))
            r["fault"] = None
    return rows + extra


def _image_bytes(r: dict, i: int, size: tuple[int, int], png_every: int) -> tuple[bytes, str]:
    f = r["fault"]
    arr = radiograph(size[0] + 8 * (i % 3), size[1] - 6 * (i % 4), seed=i)
    if f == "tiny_image":
        return _jpeg(radiograph(40, 50)), "jpeg"
    if f == "blank_image":
        return _jpeg(np.full((300, 280), 128, np.uint8)), "jpeg"
    if f == "truncated_jpeg":
        data = _jpeg(arr)
        return data[: len(data) // 2], "jpeg"
    if f == "corrupt_image":
        return b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20, "jpeg"
    if f == "empty_image":
        return b"", "jpeg"
    if png_every and i % png_every == png_every - 1:
        return _png(arr), "png"
    return _jpeg(arr), "jpeg"


def write_mimic_jpg_tree(root, n_studies: int = 8, images_per_study: int = 2, *,
                         faults=(), seed: int = 0, size=(320, 272), png_every: int = 0,
                         gz: bool = True, reports_zip: bool = False) -> MimicTree:
    """A MIMIC-CXR-JPG root + reports folder under ``root``; one extra study per fault in
    ``faults`` (names from ALL_FAULTS), each expected to be rejected with its reason."""
    root = Path(root)
    images_root, reports_dir = root / "mimic-cxr-jpg", root / "mimic-cxr-reports"
    rng = random.Random(seed)
    rows = _apply_row_faults(_plan_rows(n_studies, images_per_study, faults, rng))
    tree = MimicTree(images_root, reports_dir, metadata_dir=images_root)
    meta, split, labels = [], [], {}
    for i, r in enumerate(rows):
        f = r["fault"]
        meta.append([r["dicom"], r.get("subject_csv", r["subject"]), r["study"], "CHEST", r["view"],
                     size[0], size[1], "21800506", "213014.531", "CHEST", "postero-anterior", "Erect"])
        if r["split"]:
            split.append([r["dicom"], r["study"], r["subject"], r["split"]])
        labels[r["study"]] = [r["subject"], r["study"]] + [
            rng.choice(["1.0", "0.0", "-1.0", ""]) for _ in CHEXPERT]
        if f == "unsafe_id" or f == "bad_subject_id":
            tree.expected_rejects[r["dicom"]] = _FAULT_REASON[f]
            continue
        d = _study_dir(images_root, r["subject"], r["study"])
        d.mkdir(parents=True, exist_ok=True)
        data, kind = _image_bytes(r, i, size, png_every)
        if f != "missing_image" and f != "duplicate_dicom_id_copy":
            (d / f"{r['dicom']}.{'png' if kind == 'png' else 'jpg'}").write_bytes(data)
        rep = {"empty_report": b"  \n", "binary_report": bytes(range(256)) * 4}.get(f, r["report"])
        rd = _study_dir(reports_dir, r["subject"], r["study"])
        rd.parent.mkdir(parents=True, exist_ok=True)
        if f != "missing_report":
            rd.with_suffix(".txt").write_bytes(rep)
            tree.reports[r["study"]] = rep
        if f == "duplicate_dicom_id_copy":
            tree.expected_rejects.setdefault(r["dicom"] + "#dup", "duplicate_dicom_id")
        elif f:
            tree.expected_rejects[r["dicom"]] = _FAULT_REASON[f]
        else:
            tree.expected_samples[r["dicom"]] = dict(subject=r["subject"], study=r["study"],
                                                     split=r["split"], view=r["view"], kind=kind)
    # A file no CSV row names: must be ignored.
    (images_root / "files" / "p10" / "stray.jpg").write_bytes(_jpeg(radiograph(300, 300)))
    _write_gz_csv(images_root / "mimic-cxr-2.0.0-metadata.csv", [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
        "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta, gz)
    _write_gz_csv(images_root / "mimic-cxr-2.0.0-split.csv",
                  ["dicom_id", "study_id", "subject_id", "split"], split, gz)
    _write_gz_csv(images_root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id"] + CHEXPERT,
                  list(labels.values()), gz)
    if reports_zip:
        tree.reports_zip = root / "mimic-cxr-reports.zip"
        with zipfile.ZipFile(tree.reports_zip, "w") as zf:
            for p in sorted(reports_dir.rglob("*.txt")):
                zf.write(p, "mimic-cxr-reports/" + p.relative_to(reports_dir).as_posix())
    return tree


def write_dicom(path: Path, arr: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12,
                window: tuple[float, float] | None = None, view: str = "PA") -> None:
    """An uncompressed DICOM (Secondary Capture) with pydicom; ``arr`` holds stored values."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "CR", view
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    allocated = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits, bits - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


# transfer syntaxes GDCM can write (and the sharder must read): name -> gdcm.TransferSyntax attr
COMPRESSED_SYNTAXES = {"jpeg_lossless": "JPEGLosslessProcess14_1", "jpeg_ls": "JPEGLSLossless",
                       "jpeg2000_lossless": "JPEG2000Lossless", "rle": "RLELossless",
                       "jpeg_baseline": "JPEGBaselineProcess1"}
# (not JPEG Extended: for 12-bit data GDCM writes a precision-16 lossy stream, which is invalid;
#  tests build genuine 12-bit JPEG streams with imagecodecs instead)


def compress_dicom(src: Path, dst: Path, syntax: str) -> None:
    """Re-encode a DICOM file with GDCM (``syntax``: a COMPRESSED_SYNTAXES key), as a PACS would."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), src
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, COMPRESSED_SYNTAXES[syntax])))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), dst


HTJ2K = "1.2.840.10008.1.2.4.201"  # python-gdcm cannot decode it; pylibjpeg-openjpeg (not a dependency) can


def relabelled_dicom(path: Path, uid: str = HTJ2K) -> bytes:
    """The DICOM at ``path`` relabelled as transfer syntax ``uid`` (23 characters) with one
    meaningless encapsulated fragment. Written as HTJ2K and patched: pydicom refuses to write a
    syntax it does not know."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = HTJ2K
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert len(uid) == 23 and buf.getvalue().count(HTJ2K.encode()) == 1
    return buf.getvalue().replace(HTJ2K.encode(), uid.encode())


def htj2k_decodable() -> bool:
    """Whether this environment has an HTJ2K decoder (then the missing-decoder tests cannot run)."""
    from pydicom.pixels import get_decoder

    return get_decoder(HTJ2K).is_available


def write_mimic_dicom_tree(root, n_studies: int = 4, *, seed: int = 1, with_jpg_csvs: bool = True,
                           size=(300, 256)) -> MimicTree:
    """A MIMIC-CXR DICOM root (cxr-record-list.csv.gz) with MONOCHROME1/2, 12/16-bit, windowed
    and unwindowed, uncompressed and JPEG-lossless files; the JPG CSVs go to a separate
    ``mimic-cxr-jpg-csvs`` folder."""
    root = Path(root)
    images_root, reports_dir = root / "mimic-cxr", root / "mimic-cxr-reports"
    csv_dir = root / "mimic-cxr-jpg-csvs"
    csv_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tree = MimicTree(images_root, reports_dir, metadata_dir=csv_dir if with_jpg_csvs else None)
    records, meta, split, labels = [], [], [], []
    variants = [("MONOCHROME2", 12, (2048, 4096)), ("MONOCHROME1", 12, (2048, 4096)),
                ("MONOCHROME2", 16, None), ("MONOCHROME1", 16, (30000, 40000))]
    for s in range(n_studies):
        subject, study, dicom = 11000000 + s, 52000000 + s, _dicom_id(rng)
        photometric, bits, window = variants[s % len(variants)]
        arr = radiograph(*size, seed=s).astype(np.float32) / 255 * (2 ** bits - 1)
        if photometric == "MONOCHROME1":
            arr = (2 ** bits - 1) - arr  # stored inverted: bone dark
        rel = f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.dcm"
        write_dicom(images_root / rel, arr, photometric=photometric, bits=bits, window=window)
        if s % 4 == 1:  # JPEG lossless, as many PACS store CR/DX: shards must not change
            compress_dicom(images_root / rel, images_root / rel, "jpeg_lossless")
        records.append([subject, study, dicom, rel])
        meta.append([dicom, subject, study, "CHEST", "PA", size[0], size[1], "", "", "", "", ""])
        split.append([dicom, study, subject, _split_of(s)])
        labels.append([subject, study] + ["1.0"] + [""] * 13)
        rd = _study_dir(reports_dir, subject, study).with_suffix(".txt")
        rd.parent.mkdir(parents=True, exist_ok=True)
        rd.write_bytes(REPORTS[s % len(REPORTS)])
        tree.reports[study] = REPORTS[s % len(REPORTS)]
        tree.expected_samples[dicom] = dict(subject=subject, study=study, split=_split_of(s),
                                            view="PA", kind="dicom", photometric=photometric)
    _write_gz_csv(images_root / "cxr-record-list.csv", ["subject_id", "study_id", "dicom_id", "path"],
                  records)
    if with_jpg_csvs:
        _write_gz_csv(csv_dir / "mimic-cxr-2.0.0-metadata.csv", [
            "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
            "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
            "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta)
        _write_gz_csv(csv_dir / "mimic-cxr-2.0.0-split.csv",
                      ["dicom_id", "study_id", "subject_id", "split"], split)
        _write_gz_csv(csv_dir / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id"] + CHEXPERT,
                      labels)
    return tree


def output_digest(out) -> dict:
    """sha256 of every output file (per-shard sidecars under _parts aside); the manifest minus its
    created_by block, so runs at different times compare equal when their bytes do."""
    import hashlib
    import json
    from pathlib import Path
    out = Path(out)
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and "_parts" not in p.relative_to(out).parts:
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                m.pop("created_by")
                data = json.dumps(m, sort_keys=True).encode()
            files[p.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return files
