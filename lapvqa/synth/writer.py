"""Write the synthetic set to disk in MIMIC-CXR-JPG's layout (plus the reports and a truth file).

Files written under ``out``::

    files/p1X/p1XXXXXXX/sYYYYYYYY/<dicom_id>.jpg     the radiographs (8-bit grayscale JPEG)
    files/p1X/p1XXXXXXX/sYYYYYYYY.txt                the reports (as mimic-cxr-reports unpacks)
    mimic-cxr-reports.zip                            the same reports zipped (--reports zip|both)
    mimic-cxr-2.0.0-{metadata,split,chexpert,negbio}.csv.gz
    synth-truth.jsonl                                what each study really shows (not in MIMIC)

Images are rendered by a process pool; every image has its own seed, so the bytes do not depend
on the number of workers.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import simplejpeg

from lapvqa.synth.cohort import SPLITS, ImageSpec, StudySpec, SynthConfig, build_cohort
from lapvqa.synth.phrases import BY_KEY, FINDING_KEYS
from lapvqa.synth.render import render
from lapvqa.synth.reports import write_report

CHEXPERT_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices")
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
TRUTH_FILE = "synth-truth.jsonl"
OWNED = ("files", "mimic-cxr-reports.zip", TRUTH_FILE) + tuple(
    f"mimic-cxr-2.0.0-{n}.csv.gz" for n in ("metadata", "split", "chexpert", "negbio"))
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral",
                 "LL": "left lateral"}


@dataclass(frozen=True)
class SynthSummary:
    out: str
    studies: int
    images: int
    patients: int
    by_split: dict
    prevalence: dict  # finding key -> fraction of studies where it is present
    seconds: float


def synthesize(cfg: SynthConfig) -> SynthSummary:
    """Build the cohort, render every image, write reports, CSVs and the truth file."""
    cfg.check()
    t0 = time.perf_counter()
    _prepare_out(cfg)
    studies = build_cohort(cfg)
    _render_all(cfg, studies)
    _write_reports(cfg, studies)
    _write_csvs(cfg.out, studies)
    _write_truth(cfg.out, studies)
    return _summary(cfg.out, studies, time.perf_counter() - t0)


def _prepare_out(cfg: SynthConfig) -> None:
    ours = os.path.exists(os.path.join(cfg.out, TRUTH_FILE))
    if ours or os.path.exists(os.path.join(cfg.out, "files")):
        if not cfg.force:
            raise FileExistsError(f"{cfg.out} already holds a MIMIC-style tree; "
                                  "pass --force to replace it")
        if not ours:
            raise FileExistsError(f"{cfg.out}/files was not written by lapvqa.synth; "
                                  "not deleting it")
        for name in OWNED:  # only what this module writes, never anything else in the folder
            path = os.path.join(cfg.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(cfg.out, exist_ok=True)


def study_dir(out: str, subject_id: int, study_id: int) -> str:
    s = str(subject_id)
    return os.path.join(out, "files", f"p{s[:2]}", f"p{s}", f"s{study_id}")


def _render_all(cfg: SynthConfig, studies: list[StudySpec]) -> None:
    tasks = [(cfg.out, st, im, cfg.jpeg_quality) for st in studies for im in st.images]
    workers = cfg.workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(tasks) < 8:
        for task in tasks:
            _render_one(task)
        return
    # forkserver: safe even when the caller already runs threads (torch, DeepSpeed).
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver")) as pool:
        for _ in pool.map(_render_one, tasks, chunksize=4):
            pass


def _render_one(task: tuple[str, StudySpec, ImageSpec, int]) -> None:
    out, study, image, quality = task
    pixels = render(study, image)
    data = simplejpeg.encode_jpeg(pixels[:, :, None], quality=quality, colorspace="GRAY",
                                  colorsubsampling="Gray")
    folder = study_dir(out, study.subject_id, study.study_id)
    os.makedirs(folder, exist_ok=True)
    _write_atomic(os.path.join(folder, f"{image.dicom_id}.jpg"), data)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_reports(cfg: SynthConfig, studies: list[StudySpec]) -> None:
    texts = {st.study_id: write_report(st, cfg.odd_layout_rate, cfg.impression_only_rate,
                                       cfg.variety) for st in studies}
    if cfg.reports in ("tree", "both"):
        for st in studies:
            path = study_dir(cfg.out, st.subject_id, st.study_id) + ".txt"
            _write_atomic(path, texts[st.study_id].encode())
    if cfg.reports in ("zip", "both"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for st in sorted(studies, key=lambda s: (s.subject_id, s.study_id)):
                s = str(st.subject_id)
                # A fixed timestamp keeps the zip byte-identical for a seed.
                info = zipfile.ZipInfo(f"files/p{s[:2]}/p{s}/s{st.study_id}.txt",
                                       (2020, 1, 1, 0, 0, 0))
                zf.writestr(info, texts[st.study_id], zipfile.ZIP_DEFLATED)
        _write_atomic(os.path.join(cfg.out, "mimic-cxr-reports.zip"), buf.getvalue())


def chexpert_row(study: StudySpec) -> dict[str, str]:
    """The 14 CheXpert labels as the report states them (1.0/0.0/-1.0/blank)."""
    row = {c: "" for c in CHEXPERT_COLUMNS}
    for key, state in study.findings.items():
        if state.statement is not None:
            row[BY_KEY[key].chexpert] = f"{float(state.statement):.1f}"
    cons = study.findings["consolidation"].statement
    if cons in (1, -1):
        row["Lung Opacity"] = f"{float(cons):.1f}"
    if study.findings["consolidation"].pneumonia:  # "... could represent pneumonia."
        row["Pneumonia"] = "-1.0"
    pathology = [k for k in FINDING_KEYS
                 if k != "devices" and study.findings[k].statement in (1, -1)]
    # CheXpert: No Finding = 1 when no pathology is positive or uncertain (devices do not count).
    if not pathology:
        row["No Finding"] = "1.0"
    return row


def _write_csvs(out: str, studies: list[StudySpec]) -> None:
    meta, split, labels = [], [], []
    for st in sorted(studies, key=lambda s: (s.subject_id, s.study_id)):
        for im in st.images:
            meta.append(_metadata_row(st, im))
            split.append({"dicom_id": im.dicom_id, "study_id": st.study_id,
                          "subject_id": st.subject_id, "split": st.split})
        labels.append({"subject_id": st.subject_id, "study_id": st.study_id, **chexpert_row(st)})
    _write_csv_gz(out, "metadata", METADATA_COLUMNS, meta)
    _write_csv_gz(out, "split", ("dicom_id", "study_id", "subject_id", "split"), split)
    for name in ("chexpert", "negbio"):
        _write_csv_gz(out, name, ("subject_id", "study_id") + CHEXPERT_COLUMNS, labels)


def _metadata_row(st: StudySpec, im: ImageSpec) -> dict:
    procedure = "CHEST (PA AND LAT)" if st.frontal == "PA" else "CHEST (PORTABLE AP)"
    orientation = "Erect" if st.frontal == "PA" else ("Recumbent" if im.seed % 3 == 0 else "Erect")
    return {
        "dicom_id": im.dicom_id, "subject_id": st.subject_id, "study_id": st.study_id,
        "PerformedProcedureStepDescription": procedure, "ViewPosition": im.view,
        "Rows": im.rows, "Columns": im.cols, "StudyDate": st.date, "StudyTime": st.time,
        "ProcedureCodeSequence_CodeMeaning": procedure,
        "ViewCodeSequence_CodeMeaning": _VIEW_MEANING[im.view],
        "PatientOrientationCodeSequence_CodeMeaning": orientation,
    }


def _write_csv_gz(out: str, name: str, columns, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    # mtime=0: byte-identical output for the same seed.
    data = gzip.compress(text.getvalue().encode(), mtime=0)
    _write_atomic(os.path.join(out, f"mimic-cxr-2.0.0-{name}.csv.gz"), data)


def _write_truth(out: str, studies: list[StudySpec]) -> None:
    lines = []
    for st in studies:
        lines.append(json.dumps({
            "subject_id": st.subject_id, "study_id": st.study_id, "split": st.split,
            "truth": st.truth(),
            "findings": {k: {kk: vv for kk, vv in asdict(s).items() if kk != "present"}
                         for k, s in st.findings.items() if s.present},
            "images": [{"dicom_id": im.dicom_id, "view": im.view, "rows": im.rows, "cols": im.cols}
                       for im in st.images],
        }, sort_keys=True))
    _write_atomic(os.path.join(out, TRUTH_FILE), ("\n".join(lines) + "\n").encode())


def read_truth(root: str) -> dict[int, dict]:
    """study_id -> the truth record written by ``synthesize``."""
    with open(os.path.join(root, TRUTH_FILE), encoding="utf-8") as f:
        return {rec["study_id"]: rec for rec in map(json.loads, filter(str.strip, f))}


def _summary(out: str, studies: list[StudySpec], seconds: float) -> SynthSummary:
    n = len(studies)
    return SynthSummary(
        out=out, studies=n, images=sum(len(s.images) for s in studies),
        patients=len({s.subject_id for s in studies}),
        by_split={sp: sum(1 for s in studies if s.split == sp) for sp in SPLITS},
        prevalence={k: round(sum(s.findings[k].present for s in studies) / n, 3)
                    for k in FINDING_KEYS},
        seconds=round(seconds, 2),
    )
