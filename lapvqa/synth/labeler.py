"""A small rule-based report labeler (CheXpert/NegBio in miniature) for the synthetic findings.

It reads free text -- a synthetic report or a model's generated one -- clause by clause: a clause
that mentions a finding is negative when a negation word precedes the mention or the clause says
"normal"/"sharp"/"clear", uncertain when it hedges, else positive. A report's label per finding
follows CheXpert's aggregation: any positive mention wins, then uncertain, then negative;
``None`` when the finding is never mentioned.
"""

from __future__ import annotations

import re
from typing import Optional

from lapvqa.synth.phrases import (
    CLAUSE_SPLIT, FINDINGS, NEGATION, PSEUDO_NEGATION, UNCERTAINTY, Finding, compile_ci,
)

Label = Optional[int]  # 1 positive, 0 negative, -1 uncertain, None not mentioned

_CLAUSE = compile_ci(CLAUSE_SPLIT)
_NEG = compile_ci(NEGATION)
_PSEUDO = compile_ci(PSEUDO_NEGATION)
_UNC = compile_ci(UNCERTAINTY)
_COMPILED = {f.key: (compile_ci(f.mention), f.normal and compile_ci(f.normal),
                     f.needs_positive and compile_ci(f.needs_positive)) for f in FINDINGS}
# Section headers and de-identification marks are not statements.
_NOISE = re.compile(r"\b[A-Z ]{4,}:|_{2,}")
_HEADER = re.compile(r"^ ?([A-Z][A-Z /()]{2,}):", re.MULTILINE)
_STATEMENT_SECTIONS = ("FINDINGS", "IMPRESSION")


def statement_text(report: str) -> str:
    """The part of a MIMIC-style report that states findings (as CheXpert's labeler reads it).

    FINDINGS and IMPRESSION when present; otherwise what follows the last header line (free-text
    reports). The INDICATION ("eval for pneumothorax") and a WET READ preamble are not statements.
    """
    if "FINAL REPORT" in report:
        report = report[report.index("FINAL REPORT") + len("FINAL REPORT"):]
    headers = list(_HEADER.finditer(report))
    if not headers:
        return report
    wanted = [h for h in headers if h.group(1).strip() in _STATEMENT_SECTIONS]
    if not wanted:
        last_line_end = report.find("\n", headers[-1].end())
        return "" if last_line_end < 0 else report[last_line_end:]
    parts = []
    for h in wanted:
        following = [o.start() for o in headers if o.start() > h.start()]
        parts.append(report[h.end(): following[0] if following else len(report)])
    return "\n".join(parts)


def clauses(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", _NOISE.sub(" ", text))
    return [c.strip() for c in _CLAUSE.split(text) if c and c.strip()]


def classify_clause(clause: str, finding: Finding) -> Label:
    """The clause's statement about ``finding``, or None if it does not talk about it."""
    mention_re, normal_re, positive_re = _COMPILED[finding.key]
    m = mention_re.search(clause)
    if m is None:
        return None
    before = _PSEUDO.sub(" ", clause[: m.start()])
    if _NEG.search(before) or (normal_re and normal_re.search(clause)):
        return 0
    if positive_re and not positive_re.search(clause):
        return None  # "the heart" with nothing said about its size
    if _UNC.search(clause):
        return -1
    return 1


def label_report(text: str) -> dict[str, Label]:
    """Per finding key: 1, 0, -1 or None (not mentioned), aggregated over the text's statements.

    ``text`` may be a whole MIMIC-style report (only its FINDINGS/IMPRESSION are read) or bare
    statements such as a model's generated text.
    """
    found: dict[str, set[int]] = {f.key: set() for f in FINDINGS}
    for clause in clauses(statement_text(text)):
        for finding in FINDINGS:
            label = classify_clause(clause, finding)
            if label is not None:
                found[finding.key].add(label)
    return {key: _aggregate(labels) for key, labels in found.items()}


def _aggregate(labels: set[int]) -> Label:
    for label in (1, -1, 0):
        if label in labels:
            return label
    return None


def present(text: str) -> dict[str, bool]:
    """Binary reading used for agreement: positive (or hedged) mention means present."""
    return {key: label in (1, -1) for key, label in label_report(text).items()}
