"""Who is in the synthetic set: patients, studies, images, findings and what each report says.

Everything is drawn from one ``numpy`` generator seeded by ``SynthConfig.seed`` in a fixed order,
and every image gets its own derived seed, so the tree is identical however many processes render
it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from lapvqa.synth.phrases import DEVICE_KINDS, FINDING_KEYS

SPLITS = ("train", "validate", "test")
# Sizes as the real MIMIC-CXR-JPG files come (rows x columns around 3056 x 2544).
FULL_SIZE = (2500, 3056)


@dataclass(frozen=True)
class SynthConfig:
    out: str
    studies: int = 300
    seed: int = 0
    findings: tuple[str, ...] = FINDING_KEYS  # which findings are ever present
    prevalence: float = 0.45  # per finding, independently
    min_size: int = 700  # longer image side, pixels
    max_size: int = 1200
    lateral_rate: float = 0.6  # studies that also have a lateral view
    ap_rate: float = 0.35  # portable AP (otherwise PA) frontal views
    uncertain_rate: float = 0.05  # present findings the report only hedges about (CheXpert -1)
    omit_negative_rate: float = 0.1  # absent findings the report never mentions (CheXpert blank)
    impression_only_rate: float = 0.1  # reports with no FINDINGS section
    odd_layout_rate: float = 0.06  # old-style / free-text / wet-read reports
    variety: str = "full"  # report wording: full (realistic mix) | low (fixed sentences: demo)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/validate/test by patient
    reports: str = "tree"  # tree | zip | both
    jpeg_quality: int = 92
    workers: int = 0  # 0: one per core (at most 8)
    force: bool = False

    def check(self) -> None:
        if self.studies < 1:
            raise ValueError("--studies must be at least 1")
        unknown = set(self.findings) - set(FINDING_KEYS)
        if unknown:
            raise ValueError(f"unknown finding(s) {sorted(unknown)}; "
                             f"choose from {', '.join(FINDING_KEYS)}")
        if not 0.0 <= self.prevalence <= 1.0:
            raise ValueError("--prevalence must be within [0, 1]")
        if not 64 <= self.min_size <= self.max_size:
            raise ValueError("need 64 <= --min-size <= --max-size")
        if len(self.split) != 3 or min(self.split) < 0 or sum(self.split) <= 0:
            raise ValueError("--split needs three non-negative fractions, e.g. 0.8,0.1,0.1")
        if self.variety not in ("full", "low"):
            raise ValueError("--variety must be full or low")
        if self.reports not in ("tree", "zip", "both"):
            raise ValueError("--reports must be tree, zip or both")


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body habitus (in the renderer's normalised units)."""
    thorax: float  # half-width of the rib cage, in half-image widths
    lung_top: float  # apex height, fraction of image height
    diaphragm: float  # lateral costophrenic angle height
    dome: float  # how far the diaphragm domes up
    rib_spacing: float
    heart_ratio: float  # cardiothoracic ratio when the heart is normal
    sex: str


@dataclass(frozen=True)
class FindingState:
    present: bool
    statement: Optional[int]  # what the report says: 1, -1, 0, or None (not mentioned)
    side: str = ""  # "right" | "left" | "bilateral" (patient side)
    severity: int = 0  # 0..2: small/moderate/large
    devices: tuple[str, ...] = ()
    pneumonia: bool = False  # consolidation the report calls possible pneumonia (CheXpert -1)


@dataclass(frozen=True)
class ImageSpec:
    dicom_id: str
    view: str  # PA | AP | LATERAL | LL
    rows: int
    cols: int
    seed: int


@dataclass(frozen=True)
class StudySpec:
    subject_id: int
    study_id: int
    split: str
    date: int  # YYYYMMDD (MIMIC's shifted years)
    time: str  # HHMMSS.fff as MIMIC writes it
    frontal: str  # PA | AP
    anatomy: Anatomy
    findings: dict[str, FindingState]
    images: tuple[ImageSpec, ...]
    report_seed: int
    has_prior: bool = False

    def truth(self) -> dict[str, int]:
        return {k: int(s.present) for k, s in self.findings.items()}


def build_cohort(cfg: SynthConfig) -> list[StudySpec]:
    rng = np.random.default_rng(cfg.seed)
    patients = _patients(rng, cfg.studies)
    splits = _assign_splits(rng, [n for _, n, _ in patients], cfg.split)
    ids = _UniqueIds(rng)
    studies: list[StudySpec] = []
    for (subject_id, n_studies, anatomy), split in zip(patients, splits):
        day = int(rng.integers(0, 365 * 80))
        for k in range(n_studies):
            day += int(rng.integers(1, 400))
            studies.append(_study(rng, cfg, ids, subject_id, split, anatomy, day, has_prior=k > 0))
    return studies


def _patients(rng: np.random.Generator, n_studies: int) -> list[tuple[int, int, Anatomy]]:
    out, total, used = [], 0, set()
    while total < n_studies:
        subject_id = int(rng.integers(10_000_000, 20_000_000))
        if subject_id in used:
            continue
        used.add(subject_id)
        n = min(int(rng.geometric(0.55)), 4, n_studies - total)
        out.append((subject_id, n, _anatomy(rng)))
        total += n
    return out


def _anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        thorax=float(rng.uniform(0.70, 0.80)), lung_top=float(rng.uniform(0.09, 0.14)),
        diaphragm=float(rng.uniform(0.73, 0.81)), dome=float(rng.uniform(0.06, 0.09)),
        rib_spacing=float(rng.uniform(0.060, 0.072)), heart_ratio=float(rng.uniform(0.40, 0.46)),
        sex=str(rng.choice(["M", "F"])),
    )


def _assign_splits(rng: np.random.Generator, sizes: list[int], fracs) -> list[str]:
    """Whole patients per split, filled in a shuffled order until each split's study quota."""
    total = sum(sizes)
    weights = np.asarray(fracs, dtype=float) / sum(fracs)
    quota = {"test": round(weights[2] * total), "validate": round(weights[1] * total)}
    order = rng.permutation(len(sizes))
    out = ["train"] * len(sizes)
    filled = {"test": 0, "validate": 0}
    for i in order:
        for split in ("test", "validate"):
            if filled[split] < quota[split]:
                out[i] = split
                filled[split] += sizes[i]
                break
    return out


class _UniqueIds:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.studies, self.dicoms = rng, set(), set()

    def study(self) -> int:
        while (sid := int(self.rng.integers(50_000_000, 60_000_000))) in self.studies:
            pass
        self.studies.add(sid)
        return sid

    def dicom(self) -> str:
        # MIMIC's dicom_id: five dash-separated groups of 8 lowercase hex digits.
        while True:
            words = self.rng.integers(0, 2**32, size=5, dtype=np.uint64)
            did = "-".join(f"{int(w):08x}" for w in words)
            if did not in self.dicoms:
                self.dicoms.add(did)
                return did


def _study(rng, cfg: SynthConfig, ids: _UniqueIds, subject_id: int, split: str,
           anatomy: Anatomy, day: int, has_prior: bool) -> StudySpec:
    frontal = "AP" if rng.random() < cfg.ap_rate else "PA"
    findings = {key: _finding(rng, cfg, key) for key in FINDING_KEYS}
    views = [frontal]
    if rng.random() < cfg.lateral_rate:
        views.append("LL" if rng.random() < 0.05 else "LATERAL")
    if rng.random() < 0.05:
        views.append(frontal)  # a repeated frontal, as technologists often take
    images = tuple(_image(rng, cfg, ids, v) for v in views)
    return StudySpec(
        subject_id=subject_id, study_id=ids.study(), split=split, date=_date(day),
        time=_time(rng), frontal=frontal, anatomy=anatomy, findings=findings, images=images,
        report_seed=int(rng.integers(0, 2**63 - 1)), has_prior=has_prior,
    )


def _finding(rng, cfg: SynthConfig, key: str) -> FindingState:
    present = key in cfg.findings and rng.random() < cfg.prevalence
    sides = ["right", "left", "bilateral"] if key == "effusion" else ["right", "left"]
    side = str(rng.choice(sides))
    severity = int(rng.integers(0, 3))
    devices: tuple[str, ...] = ()
    if key == "devices" and present:
        n = int(rng.choice([1, 1, 2, 3]))
        devices = tuple(sorted(rng.choice(DEVICE_KINDS, size=n, replace=False).tolist(),
                               key=DEVICE_KINDS.index))
    if present:
        hedgeable = key in ("effusion", "pneumothorax", "consolidation")
        hedged = hedgeable and rng.random() < cfg.uncertain_rate
        statement: Optional[int] = -1 if hedged else 1
        severity = 0 if hedged else severity
    else:
        statement = None if rng.random() < cfg.omit_negative_rate else 0
    pneumonia = key == "consolidation" and statement == 1 and rng.random() < 0.3
    return FindingState(present, statement, side, severity, devices, pneumonia)


def _image(rng, cfg: SynthConfig, ids: _UniqueIds, view: str) -> ImageSpec:
    long_side = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    # Most radiographs are portrait (rows > columns); portable APs are often landscape.
    aspect = float(rng.uniform(1.0, 1.25)) if rng.random() < 0.8 else float(rng.uniform(0.8, 1.0))
    if aspect >= 1.0:
        rows, cols = long_side, int(round(long_side / aspect))
    else:
        rows, cols = int(round(long_side * aspect)), long_side
    return ImageSpec(ids.dicom(), view, rows, cols, int(rng.integers(0, 2**63 - 1)))


def _date(day: int) -> int:
    y, rem = divmod(day, 365)
    m, d = divmod(rem, 31)
    return (2110 + y) * 10000 + (m % 12 + 1) * 100 + min(d + 1, 28)


def _time(rng) -> str:
    h, m, s, ms = (int(rng.integers(0, n)) for n in (24, 60, 60, 1000))
    # MIMIC stores StudyTime as a float: no leading zeros, three decimals.
    return f"{h * 10000 + m * 100 + s}.{ms:03d}"


def size_range(full_size: bool, min_size: int, max_size: int) -> tuple[int, int]:
    return FULL_SIZE if full_size else (min_size, max_size)


def count_by_split(studies: list[StudySpec]) -> dict[str, int]:
    return {s: sum(1 for st in studies if st.split == s) for s in SPLITS}
