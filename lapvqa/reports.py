"""MIMIC-CXR free-text reports: robust decoding, section parsing and the text we train on.

A MIMIC report looks like::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)
     INDICATION:  ___F with cough
     FINDINGS:
     There is no focal consolidation, pleural effusion or pneumothorax.  The
     cardiomediastinal silhouette is normal.
     IMPRESSION:  No acute cardiopulmonary process.

Real reports vary: a ``WET READ`` preamble before the banner, no banner, no FINDINGS, only free
text, headers in odd case or spelling (``FINDINGS AND IMPRESSION``, ``CONCLUSION``), hard wraps at
~78 columns, CRLF line ends, ``___`` de-identification placeholders (kept: they are what the
model will see at inference too) and the odd non-UTF-8 byte.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

__all__ = ["ParsedReport", "decode_report", "parse_report", "report_text", "SECTION_MODES",
           "ReportError"]

SECTION_MODES = ("full", "findings-impression")

# Header aliases, upper case. A FINDINGS+IMPRESSION combined header counts as findings.
_FINDINGS = {"FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION",
             "FINDINGS AND IMPRESSIONS", "REPORT", "PA AND LATERAL VIEWS OF THE CHEST"}
_IMPRESSION = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY", "OPINION"}
# The banner line; it and anything before it (e.g. a WET READ preamble) are dropped.
_BANNER = re.compile(r"^\s*FINAL REPORT\s*$", re.IGNORECASE)
# "HEADER: rest". Upper-case only (plus the known aliases in any case), so prose such as
# "Note: ..." inside a paragraph is not split; at most 60 chars so sentences are not headers.
_HEADER = re.compile(r"^\s*([A-Za-z][A-Za-z0-9 ,/&()'\-]{0,59}?)\s*:(?!\d)\s*(.*)$")
_LIST_ITEM = re.compile(r"^\s*\d{1,2}[.)]\s")
_SPACES = re.compile(r"[ \t\u00a0]+")


class ReportError(ValueError):
    """A report that cannot be used; ``reason`` is the rejects.jsonl reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class ParsedReport:
    sections: list[tuple[str, str]]  # (HEADER or "" for untitled text, body)
    had_banner: bool = False
    warnings: list[str] = field(default_factory=list)

    def section(self, names: set[str]) -> str:
        return "\n".join(body for name, body in self.sections if name in names and body)

    @property
    def findings(self) -> str:
        return self.section(_FINDINGS)

    @property
    def impression(self) -> str:
        return self.section(_IMPRESSION)


def decode_report(data: bytes) -> tuple[str, list[str]]:
    """Bytes -> text. UTF-8 first; otherwise cp1252/latin-1 (kept, with a warning)."""
    warnings = []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        warnings.append("report_non_utf8")
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    bad = sum(1 for c in text if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn")
              and c not in "\n\r\t\f")
    if text and bad > max(3, 0.05 * len(text)):
        raise ReportError("report_undecodable", f"{bad} control/binary characters")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    return text, warnings


def _header(line: str) -> tuple[str, str] | None:
    m = _HEADER.match(line)
    if not m:
        return None
    name = _SPACES.sub(" ", m.group(1)).strip()
    upper = name.upper()
    if name != upper and upper not in _FINDINGS | _IMPRESSION:
        return None
    return upper, m.group(2)


def _join_paragraphs(lines: list[str]) -> str:
    """Undo hard wraps: lines of a paragraph joined by spaces; paragraphs and list items by \\n."""
    paras: list[list[str]] = [[]]
    for raw in lines:
        line = _SPACES.sub(" ", raw).strip()
        if not line:
            if paras[-1]:
                paras.append([])
            continue
        if _LIST_ITEM.match(line) and paras[-1]:
            paras.append([])
        paras[-1].append(line)
    return "\n".join(" ".join(p) for p in paras if p)


def parse_report(text: str) -> ParsedReport:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n").split("\n")
    banner = next((i for i, line in enumerate(lines) if _BANNER.match(line)), None)
    if banner is not None:
        lines = lines[banner + 1:]
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        head = _header(line)
        if head:
            sections.append((head[0], [head[1]]))
        else:
            sections[-1][1].append(line)
    parsed = [(name, _join_paragraphs(body)) for name, body in sections]
    parsed = [(n, b) for n, b in parsed if n or b]
    report = ParsedReport(parsed, had_banner=banner is not None)
    if not any(name for name, _ in parsed):
        report.warnings.append("report_no_sections")
    return report


def report_text(report: ParsedReport, sections: str = "full") -> str:
    """The text we train on. ``full``: every section (banner dropped), one ``HEADER: body`` per
    line; ``findings-impression``: only those two. Raises ReportError if nothing is left."""
    if sections == "full":
        parts = [f"{n}: {b}" if n else b for n, b in report.sections if b]
    elif sections == "findings-impression":
        parts = [f"{label}: {body}" for label, body in
                 (("FINDINGS", report.findings), ("IMPRESSION", report.impression)) if body]
        if not parts:
            raise ReportError("report_no_findings_impression")
    else:
        raise ValueError(f"sections must be one of {SECTION_MODES}, not {sections!r}")
    text = "\n".join(parts).strip()
    if not text:
        raise ReportError("report_empty")
    return text
