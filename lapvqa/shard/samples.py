"""One record (image row) -> the members of one WebDataset sample, or a reject with a reason."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from dataclasses import dataclass

import numpy as np

from .. import reports as rep
from ..storage import Store, open_store
from ..tokenizer import encode, get_tokenizer
from .config import ShardConfig
from .images import ImageError, process_image
from .inputs import CHEXPERT_LABELS, Record, ReportSource

__all__ = ["Sources", "SampleResult", "read_inputs", "make_sample", "tokens_for"]

# MIMIC-CXR-JPG names images *.jpg, but converted trees often hold *.png: try those too.
_ALT_EXT = (".png", ".jpeg", ".dcm")


class Sources:
    """Per-process readers of image and report bytes (stores and zip handles are not shared)."""

    def __init__(self, images_url: str, reports: ReportSource):
        self.images: Store = open_store(images_url)
        self.reports = reports
        self._store = None if reports.is_zip else open_store(reports.url)
        self._zip: zipfile.ZipFile | None = None
        self._lock = threading.Lock()  # read-ahead threads share one zip handle

    def image_bytes(self, rel: str) -> bytes:
        try:
            return _read_retry(self.images, rel)
        except FileNotFoundError:
            stem = rel.rsplit(".", 1)[0]
            for ext in _ALT_EXT:
                alt = stem + ext
                if alt != rel and self.images.exists(alt):
                    return _read_retry(self.images, alt)
            raise

    def report_bytes(self, loc: str) -> bytes:
        if not loc:
            raise FileNotFoundError("study not in the reports zip")
        if self.reports.is_zip:
            with self._lock:
                if self._zip is None:
                    self._zip = zipfile.ZipFile(self.reports.url)
            return self._zip.read(loc)  # ZipFile serialises reads of its file internally
        return _read_retry(self._store, loc)


def _read_retry(store: Store, name: str) -> bytes:
    # One retry: cluster file systems and S3 have transient errors that must not become rejects.
    try:
        return store.read_bytes(name)
    except FileNotFoundError:
        raise
    except OSError:
        return store.read_bytes(name)


@dataclass
class SampleResult:
    key: str
    members: dict[str, bytes] | None  # None -> rejected
    reject: dict | None
    warnings: list[str]
    n_tokens: int = 0


def read_inputs(src: Sources, rec: Record) -> tuple:
    """(image bytes | exception, report bytes | exception): runs in I/O threads."""
    out = []
    for fn, arg in ((src.image_bytes, rec.image), (src.report_bytes, rec.report)):
        try:
            out.append(fn(arg))
        except Exception as e:  # handed to make_sample, which turns it into a reject
            out.append(e)
    return tuple(out)


def tokens_for(text: str, max_tokens: int) -> tuple[str, list[int], bool, int]:
    """(text, tokens, truncated, full length). A truncated text is cut at a token boundary and
    re-encoded, so the stored tokens are always exactly encode(stored text)."""
    tokens = encode(text)
    full = len(tokens)
    if full <= max_tokens:
        return text, tokens, False, full
    k = max_tokens
    while k > 0:
        cut = get_tokenizer().decode(tokens[:k], errors="ignore")
        again = encode(cut)
        if len(again) <= max_tokens:
            return cut, again, True, full
        k -= 1
    return "", [], True, full


def _reject(rec: Record, reason: str, detail: str = "", warnings=()) -> SampleResult:
    from .plan import reject_entry

    return SampleResult(rec.dicom_id, None, reject_entry(rec, reason, detail), list(warnings))


def _text(rec: Record, data, cfg: ShardConfig) -> tuple[str, list[str]]:
    if not rec.report or isinstance(data, (FileNotFoundError, KeyError)):
        raise rep.ReportError("report_missing", f"no report s{rec.study_id}.txt")
    if isinstance(data, Exception):
        raise rep.ReportError("report_unreadable", f"{type(data).__name__}: {data}"[:200])
    if not data.strip():
        raise rep.ReportError("report_empty", "0 bytes" if not data else "whitespace only")
    text, warnings = rep.decode_report(data)
    parsed = rep.parse_report(text)
    return rep.report_text(parsed, cfg.sections), warnings + parsed.warnings


def make_sample(rec: Record, inputs: tuple, cfg: ShardConfig) -> SampleResult:
    img_data, rep_data = inputs
    try:
        text, warnings = _text(rec, rep_data, cfg)
    except rep.ReportError as e:
        return _reject(rec, e.reason, e.detail)
    if isinstance(img_data, FileNotFoundError):
        return _reject(rec, "image_missing", rec.image, warnings)
    if isinstance(img_data, Exception):
        return _reject(rec, "image_unreadable", f"{type(img_data).__name__}: {img_data}"[:200],
                       warnings)
    try:
        img = process_image(img_data, size=cfg.size, quality=cfg.jpeg_quality,
                            min_side=cfg.min_side)
    except ImageError as e:
        return _reject(rec, e.reason, e.detail, warnings)
    text, tokens, truncated, full = tokens_for(text, cfg.max_tokens)
    meta = {
        "subject_id": rec.subject_id, "study_id": rec.study_id, "dicom_id": rec.dicom_id,
        "view": rec.view, "split": rec.split,
        "labels": dict(zip(CHEXPERT_LABELS, rec.labels)),
        "orig_size": list(img.orig_size), "source": img.source,
        "truncated": truncated, "n_tokens": len(tokens), "n_tokens_full": full,
        "sections": cfg.sections,
    }
    buf = io.BytesIO()
    np.save(buf, np.asarray(tokens, dtype=np.uint16), allow_pickle=False)
    members = {"jpg": img.jpeg, "txt": text.encode("utf-8"), "tokens.npy": buf.getvalue(),
               "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()}
    return SampleResult(rec.dicom_id, members, None, warnings + img.warnings, len(tokens))
