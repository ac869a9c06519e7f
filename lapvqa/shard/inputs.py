"""Input discovery: a MIMIC-CXR-JPG or MIMIC-CXR (DICOM) root + reports folder/zip -> records.

Only the CSVs are read here (fast, even for 377k rows); image and report files are opened by the
workers, so a slow or remote file system is never stat-ed 377k times up front.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import zipfile
from dataclasses import dataclass, field

from ..storage import Store, open_store

__all__ = ["CHEXPERT_LABELS", "Record", "Inputs", "InputError", "discover", "ReportSource",
           "SPLITS", "read_csv_rows"]

SPLITS = ("train", "validate", "test")
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices")
_JPG_CSV = "mimic-cxr-2.0.0-{}.csv"
_RECORD_LIST = "cxr-record-list.csv"
# Default split when a DICOM root comes without MIMIC-CXR-JPG's split CSV: patient-level, from a
# hash of subject_id, with the official split's proportions (validate 0.8 %, test 1.4 %).
HASH_SPLIT = (("test", 0.014), ("validate", 0.022))


class InputError(ValueError):
    """Bad input location or layout: reported as a one-line error, exit code 2."""


@dataclass(frozen=True)
class Record:
    dicom_id: str
    subject_id: int
    study_id: int
    split: str
    view: str
    labels: tuple  # len 14, CHEXPERT_LABELS order, values 1, 0, -1 or None
    image: str  # path relative to the images root
    report: str  # path relative to the reports root, or the member name inside the zip


@dataclass
class ReportSource:
    """Where reports live: a folder (local or s3://) or a local zip; picklable for workers."""

    url: str
    is_zip: bool
    prefix: str = "files/"  # folder layout: "files/p10/p10000032/s5.txt" or "p10/..."
    members: dict = field(default_factory=dict, repr=False)  # zip: study_id -> member name

    def locate(self, subject_id: int, study_id: int) -> str | None:
        if self.is_zip:
            return self.members.get(study_id)
        s = str(subject_id)
        return f"{self.prefix}p{s[:2]}/p{s}/s{study_id}.txt"


@dataclass
class Inputs:
    kind: str  # "jpg" or "dicom"
    images_url: str
    reports: ReportSource
    records: list[Record]
    rejects: list[dict]
    split_source: str
    labels_source: str


def _open_text(store: Store, name: str) -> io.TextIOBase:
    raw = store.read_bytes(name)
    if raw[:2] == b"\x1f\x8b":  # gzip by content, whatever the name says
        raw = gzip.decompress(raw)
    return io.StringIO(raw.decode("utf-8", errors="replace"))


def read_csv_rows(store: Store, stem: str, required: tuple[str, ...]) -> list[dict] | None:
    """Rows of ``stem.csv.gz`` or ``stem.csv``; None when neither exists."""
    for name in (stem + ".gz", stem):
        if store.exists(name):
            break
    else:
        return None
    try:
        reader = csv.DictReader(_open_text(store, name))
        rows = list(reader)
    except (OSError, EOFError, csv.Error, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read {store.url(name)}: {e}") from None
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"{store.url(name)} lacks column(s) {', '.join(missing)}")
    return rows


def _int(v) -> int | None:
    try:
        return int(str(v).strip().lstrip("ps"))
    except ValueError:
        return None


def _label(v: str):
    v = (v or "").strip()
    if not v:
        return None
    try:
        return int(float(v))
    except ValueError:
        return None


def _labels(store: Store | None, which: str) -> dict[int, tuple] | None:
    if store is None:
        return None
    rows = read_csv_rows(store, _JPG_CSV.format(which), ("subject_id", "study_id"))
    if rows is None:
        return None
    return {_int(r["study_id"]): tuple(_label(r.get(k, "")) for k in CHEXPERT_LABELS) for r in rows}


def _splits(store: Store | None) -> dict[str, str] | None:
    if store is None:
        return None
    rows = read_csv_rows(store, _JPG_CSV.format("split"), ("dicom_id", "split"))
    return None if rows is None else {r["dicom_id"].strip(): r["split"].strip() for r in rows}


def hash_split(subject_id: int) -> str:
    u = int.from_bytes(hashlib.sha256(str(subject_id).encode()).digest()[:8], "big") / 2 ** 64
    return next((name for name, edge in HASH_SPLIT if u < edge), "train")


def _reports(url: str) -> ReportSource:
    if url.endswith(".zip"):
        if url.startswith("s3://"):
            raise InputError("--reports: a zip must be local (download it, or unpack it to S3)")
        try:
            with zipfile.ZipFile(url) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            raise InputError(f"--reports {url}: not a readable zip ({e})") from None
        members: dict[int, str] = {}
        for n in sorted(names):
            m = re.search(r"(?:^|/)s(\d+)\.txt$", n)
            if m:
                members.setdefault(int(m.group(1)), n)
        if not members:
            raise InputError(f"--reports {url}: no s<study_id>.txt reports inside")
        return ReportSource(url, True, members=members)
    store = open_store(url)
    if url.startswith("s3://"):
        return ReportSource(url, False, "files/")
    root = store.url("")
    if not os.path.isdir(root):
        raise InputError(f"--reports {url}: no such folder or zip")
    if os.path.isdir(os.path.join(root, "files")):
        return ReportSource(url, False, "files/")
    if any(re.fullmatch(r"p1\d", d) for d in os.listdir(root)):
        return ReportSource(url, False, "")
    raise InputError(f"--reports {url}: expected files/p1X/p1XXXXXXX/sYYYYYYYY.txt inside")


def _jpg_records(store: Store, labels, splits, rejects: list) -> list[Record]:
    rows = read_csv_rows(store, _JPG_CSV.format("metadata"),
                         ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    out = [_make(r, None, labels, splits, r.get("ViewPosition", ""), rejects) for r in rows]
    return [r for r in out if r is not None]


def _dicom_records(store: Store, labels, splits, views, rejects: list) -> list[Record]:
    rows = read_csv_rows(store, _RECORD_LIST, ("subject_id", "study_id", "dicom_id", "path"))
    out = []
    for r in rows:
        rel = r["path"].strip().lstrip("/")
        out.append(_make(r, rel, labels, splits, views.get(r["dicom_id"].strip(), ""), rejects))
    return [r for r in out if r is not None]


def _make(row, path: str | None, labels, splits, view, rejects) -> Record | None:
    """One image row -> Record; ``path`` None means MIMIC-CXR-JPG's layout."""
    dicom_id = (row.get("dicom_id") or "").strip()
    subject, study = _int(row.get("subject_id", "")), _int(row.get("study_id", ""))
    if subject is None or study is None:
        rejects.append({"dicom_id": dicom_id, "reason": "bad_id",
                        "detail": f"subject_id={row.get('subject_id')!r} study_id={row.get('study_id')!r}"})
        return None
    if splits is None:
        split = hash_split(subject)
    else:
        split = splits.get(dicom_id, "")
    if path is None:  # files/p10/p10000032/s50414267/<dicom_id>.jpg
        s = str(subject)
        path = f"files/p{s[:2]}/p{s}/s{study}/{dicom_id}.jpg"
    lab = (labels or {}).get(study, (None,) * len(CHEXPERT_LABELS))
    return Record(dicom_id, subject, study, split, (view or "").strip(), lab, path, "")


def discover(images: str, reports: str, metadata: str | None = None,
             labels: str = "chexpert") -> Inputs:
    """Read the CSVs of an images root (JPG or DICOM, detected) and locate the reports."""
    store = open_store(images)
    is_jpg = any(store.exists(_JPG_CSV.format("metadata") + s) for s in (".gz", ""))
    is_dicom = any(store.exists(_RECORD_LIST + s) for s in (".gz", ""))
    if not (is_jpg or is_dicom):
        raise InputError(f"--images {images}: neither a MIMIC-CXR-JPG root (mimic-cxr-2.0.0-"
                         "metadata.csv[.gz]) nor a MIMIC-CXR DICOM root (cxr-record-list.csv[.gz])")
    csvs = open_store(metadata) if metadata else (store if is_jpg or _has_split(store) else None)
    splits, lab = _splits(csvs), _labels(csvs, labels)
    if is_jpg and not is_dicom and splits is None:
        raise InputError(f"--images {images}: mimic-cxr-2.0.0-split.csv[.gz] is missing")
    rejects: list[dict] = []
    if is_dicom:
        meta = read_csv_rows(csvs, _JPG_CSV.format("metadata"), ("dicom_id",)) if csvs else None
        views = {r["dicom_id"].strip(): r.get("ViewPosition", "") for r in meta or []}
        records = _dicom_records(store, lab, splits, views, rejects)
    else:
        records = _jpg_records(store, lab, splits, rejects)
    src = _reports(reports)
    records = [_with_report(r, src) for r in records]
    return Inputs(
        kind="dicom" if is_dicom else "jpg", images_url=images, reports=src, records=records,
        rejects=rejects,
        split_source="mimic-cxr-2.0.0-split.csv" if splits is not None else "hash(subject_id)",
        labels_source=f"mimic-cxr-2.0.0-{labels}.csv" if lab is not None else "none")


def _has_split(store: Store) -> bool:
    return any(store.exists(_JPG_CSV.format("split") + s) for s in (".gz", ""))


def _with_report(r: Record, src: ReportSource) -> Record:
    loc = src.locate(r.subject_id, r.study_id)
    return Record(r.dicom_id, r.subject_id, r.study_id, r.split, r.view, r.labels, r.image,
                  loc or "")
