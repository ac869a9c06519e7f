"""MIMIC-style free-text reports that state exactly the study's findings.

Layout follows the real files: a right-aligned ``FINAL REPORT`` banner, one leading space on every
line, section headers (``EXAMINATION:`` ... ``IMPRESSION:``), text hard-wrapped at 78 columns,
``___`` wherever MIMIC de-identified something. Some reports have no FINDINGS section, some are
old-style or free text, a few carry a ``WET READ`` preamble -- the quirks a real-data sharder meets.
"""

from __future__ import annotations

import textwrap

import numpy as np

from lapvqa.synth import phrases as P
from lapvqa.synth.cohort import FindingState, StudySpec

BANNER = " " * 33 + "FINAL REPORT"
WIDTH = 78
_LUNG = ("consolidation", "effusion", "pneumothorax")
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}


def write_report(study: StudySpec, odd_rate: float = 0.06, impression_only_rate: float = 0.1,
                 variety: str = "full") -> str:
    """The study's report; ``odd_rate`` of them old-style/free text, some with no FINDINGS.

    ``variety="low"``: one fixed sentence per finding state in a fixed order and no filler
    sentences -- the same facts in far fewer distinct words, which a tiny model trained for
    minutes on a CPU can learn (the demo); "full" is the realistic mix.
    """
    rng = np.random.default_rng(study.report_seed)
    if variety == "low":
        statements = plain_statements(study.findings)
        odd_rate = 0.0
    else:
        statements = finding_statements(rng, study.findings)
    layout = _layout(rng, odd_rate, impression_only_rate)
    writers = {"modern": _modern, "impression_only": _impression_only, "old": _old_style,
               "free": _free_text}
    body = writers[layout](rng, study, statements, variety == "low")
    if rng.random() < odd_rate / 2:
        body = _wet_read(rng, study) + body
    return body


def _layout(rng, odd_rate: float, impression_only_rate: float) -> str:
    u = rng.random()
    if u < odd_rate / 2:
        return "old"
    if u < odd_rate:
        return "free"
    return "impression_only" if rng.random() < impression_only_rate else "modern"


# ---- statements ------------------------------------------------------------------------------
def finding_statements(rng, findings: dict[str, FindingState]) -> list[str]:
    """One sentence per mentioned finding (absent lung findings may share one joint negation)."""
    out: list[str] = []
    if findings["devices"].statement is not None:
        out.append(_statement(rng, "devices", findings["devices"]))
    absent_lung = [k for k in _LUNG if findings[k].statement == 0]
    lung_clear = all(findings[k].statement in (0, None) for k in _LUNG)
    joint = len(absent_lung) >= 2 and rng.random() < 0.6
    if lung_clear and "consolidation" in absent_lung and rng.random() < 0.3:
        out.append(str(rng.choice(P.CLEAR_LUNGS)))
        absent_lung.remove("consolidation")
        joint = joint and len(absent_lung) >= 2
    for key in _LUNG:
        state = findings[key]
        alone = state.statement == 0 and not joint and key in absent_lung
        if state.statement in (1, -1) or alone:
            out.append(_statement(rng, key, state))
    if joint:
        out.append(_joint_negative(rng, absent_lung))
    if findings["cardiomegaly"].statement is not None:
        heart = _statement(rng, "cardiomegaly", findings["cardiomegaly"])
        out.insert(int(rng.integers(0, len(out) + 1)), heart)
    if findings["consolidation"].pneumonia:
        out.append(str(rng.choice(P.PNEUMONIA_HEDGE)).strip())
    return out


PLAIN_ORDER = ("devices", "consolidation", "effusion", "pneumothorax", "cardiomegaly")


def plain_statements(findings: dict[str, FindingState]) -> list[str]:
    """Each mentioned finding's first template, in ``PLAIN_ORDER``."""
    out = []
    for key in PLAIN_ORDER:
        state = findings[key]
        if state.statement is None:
            continue
        if key == "devices" and state.statement == 1:
            out.append(". ".join(P.DEVICE_SENTENCES[k][0] for k in state.devices) + ".")
        elif state.statement == 0:
            out.append(P.NEGATIVE[key][0])
        else:
            bilateral = key == "effusion" and state.side == "bilateral"
            table = (P.UNCERTAIN[key] if state.statement == -1
                     else P.POSITIVE_BILATERAL_EFFUSION if bilateral else P.POSITIVE[key])
            out.append(_fill(table[0], key, state))
    return out


def _statement(rng, key: str, state: FindingState) -> str:
    if key == "devices":
        return _devices(rng, state) if state.statement == 1 else str(rng.choice(P.NEGATIVE[key]))
    if state.statement == 0:
        return str(rng.choice(P.NEGATIVE[key]))
    if state.statement == -1:
        return _fill(str(rng.choice(P.UNCERTAIN[key])), key, state)
    if key == "effusion" and state.side == "bilateral":
        return _fill(str(rng.choice(P.POSITIVE_BILATERAL_EFFUSION)), key, state)
    return _fill(str(rng.choice(P.POSITIVE[key])), key, state)


def _devices(rng, state: FindingState) -> str:
    parts = [str(rng.choice(P.DEVICE_SENTENCES[kind])) for kind in state.devices]
    return ". ".join(parts) + "."


def _joint_negative(rng, keys: list[str]) -> str:
    nouns = [P.JOINT_NOUN[k] for k in keys]
    if len(nouns) == 1:
        items = nouns[0]
    else:
        items = ", ".join(nouns[:-1]) + (", or " if len(nouns) > 2 else " or ") + nouns[-1]
    return str(rng.choice(P.JOINT_NEGATIVE)).format(items=items)


def _fill(template: str, key: str, state: FindingState) -> str:
    size = P.SIZES.get(key, ("small", "moderate", "large"))[state.severity]
    text = template.format(size=size, size_adv=_ADVERB.get(size, size), side=state.side,
                           Side=state.side.capitalize())
    return text[0].upper() + text[1:]


def impression_lines(rng, findings: dict[str, FindingState]) -> list[str]:
    lines = []
    for key in ("devices", "consolidation", "effusion", "pneumothorax", "cardiomegaly"):
        state = findings[key]
        if state.statement == 1:
            bilateral = key == "effusion" and state.side == "bilateral"
            table = P.IMPRESSION_BILATERAL_EFFUSION if bilateral else P.IMPRESSION_POSITIVE[key]
            lines.append(_fill(str(rng.choice(table)), key, state))
        elif state.statement == -1:
            lines.append(_fill(str(rng.choice(P.UNCERTAIN[key])), key, state))
    pathology = [k for k in P.FINDING_KEYS if k != "devices" and findings[k].statement in (1, -1)]
    if not pathology:
        lines.append(str(rng.choice(P.NO_ACUTE)))
    return lines


# ---- layouts ---------------------------------------------------------------------------------
def _header(rng, study: StudySpec) -> list[str]:
    devices = study.findings["devices"].present
    pool = P.INDICATIONS_DEVICES if devices and rng.random() < 0.6 else P.INDICATIONS
    indication = str(rng.choice(pool))
    comparison = str(rng.choice(P.COMPARISON[1:] if study.has_prior else P.COMPARISON[:2]))
    return [
        _field("EXAMINATION", P.EXAMINATION[study.frontal]), " ",
        _field("INDICATION", indication), " ",
        _field("TECHNIQUE", str(rng.choice(P.TECHNIQUE[study.frontal]))), " ",
        _field("COMPARISON", comparison),
    ]


def _modern(rng, study: StudySpec, statements: list[str], plain: bool) -> str:
    findings = statements + ([] if plain else _fillers(rng))
    impression = impression_lines(rng, study.findings)
    numbered = rng.random() < 0.2 and not plain
    return _join([BANNER] + _header(rng, study) + _section("FINDINGS", findings)
                 + _section("IMPRESSION", impression, numbered=numbered))


def _impression_only(rng, study: StudySpec, statements: list[str], plain: bool) -> str:
    return _join([BANNER] + _header(rng, study) + _section("IMPRESSION", statements))


def _old_style(rng, study: StudySpec, statements: list[str], plain: bool) -> str:
    view = "PA AND LATERAL CHEST" if study.frontal == "PA" else "PORTABLE AP CHEST"
    lines = [BANNER, f" {view} ___", " ", _field("REASON FOR EXAM", str(rng.choice(P.INDICATIONS)))]
    return _join(lines + _section("FINDINGS", statements + _fillers(rng))
                 + _section("IMPRESSION", impression_lines(rng, study.findings)))


def _free_text(rng, study: StudySpec, statements: list[str], plain: bool) -> str:
    lines = [BANNER, " CHEST RADIOGRAPH PERFORMED ON ___", " ",
             _field("COMPARISON", str(rng.choice(P.COMPARISON))), " ",
             _field("CLINICAL HISTORY", str(rng.choice(P.INDICATIONS)))]
    return _join(lines + [" "] + _wrap(statements))


def _wet_read(rng, study: StudySpec) -> str:
    lines = impression_lines(rng, study.findings)
    text = textwrap.fill("WET READ: ___ ___ ___ " + " ".join(lines), WIDTH - 1,
                         initial_indent=" ", subsequent_indent="  ")
    return text + "\n " + "_" * WIDTH + "\n"


# ---- formatting ------------------------------------------------------------------------------
def _fillers(rng) -> list[str]:
    n = int(rng.integers(0, 3))
    return [str(s) for s in rng.choice(P.OTHER_FINDINGS, size=n, replace=False)]


def _field(name: str, value: str) -> str:
    lines = textwrap.wrap(f"{name}:  {value}", WIDTH, initial_indent=" ", subsequent_indent=" ")
    return "\n".join(lines)


def _section(name: str, sentences: list[str], numbered: bool = False) -> list[str]:
    if numbered and len(sentences) > 1:
        body = []
        for i, s in enumerate(sentences, 1):
            body += _wrap([f"{i}. {s}"])
        return [" ", f" {name}: ", " "] + body
    return [" ", f" {name}: ", " "] + _wrap(sentences)


def _wrap(sentences: list[str]) -> list[str]:
    # Radiologists (and MIMIC's files) mix one and two spaces between sentences.
    text = ""
    for i, s in enumerate(sentences):
        text += ("" if i == 0 else ("  " if (i * 7 + len(s)) % 3 == 0 else " ")) + s
    return textwrap.wrap(text, WIDTH, initial_indent=" ", subsequent_indent=" ") or [" "]


def _join(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"
