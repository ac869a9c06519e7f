"""Readers for the linear-probe datasets, in the layouts their publishers distribute.

NIH ChestX-ray14 (CXR-14): ``Data_Entry_2017*.csv`` (``Image Index``, ``Finding Labels`` joined by
``|``, ``No Finding``), the official patient-wise ``train_val_list.txt`` / ``test_list.txt``, and the
1024x1024 PNGs under ``images/`` or the ``images_001/images/`` ... ``images_012/images/`` folders of
the download (any folder named ``images*`` below the root is searched).

CheXpert (v1.0 or v1.0-small): ``train.csv`` / ``valid.csv``, ``Path`` such as
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``, relative to the dataset
folder's *parent*; ``--root`` may be either that parent or the dataset folder itself.
Labels are 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned). Blank means negative (0), as in
the CheXpert paper. Uncertain labels follow :data:`DEFAULT_UNCERTAIN`: U-Ones for Atelectasis and
Edema, U-Zeros for the rest -- the per-label choice that did best in the CheXpert paper
(Irvin et al., 2019, Table 3) among the simple policies; ``ignore`` drops uncertain samples from
that class's training set (never from evaluation: ``valid.csv`` has no uncertain labels).

Rows whose image is missing are not silently skipped: they are counted by reason and reported.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

NIH_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
CHEXPERT_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
DEFAULT_UNCERTAIN = {"Atelectasis": "ones", "Cardiomegaly": "zeros", "Consolidation": "zeros",
                     "Edema": "ones", "Pleural Effusion": "zeros"}
NIH_SPLIT_FILES = {"train": "train_val_list.txt", "test": "test_list.txt"}
CHEXPERT_SPLIT_FILES = {"train": "train.csv", "test": "valid.csv"}


class ProbeDataError(ValueError):
    """A dataset that cannot be read as documented (one-line message for the CLI)."""


@dataclass
class ProbeSplit:
    """Images and labels of one split. labels: [N, C] float32; NaN = not used for that class."""

    dataset: str
    split: str
    classes: tuple[str, ...]
    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    rejects: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.paths)


# ---------------------------------------------------------------- NIH CXR-14


def _nih_entry_csv(root: str) -> str:
    found = sorted(glob.glob(os.path.join(root, "Data_Entry_2017*.csv")))
    if not found:
        raise ProbeDataError(f"{root}: no Data_Entry_2017*.csv (is this the NIH CXR-14 root?)")
    return found[-1]  # Data_Entry_2017_v2020.csv sorts after Data_Entry_2017.csv: newest wins


def _nih_labels(finding: str, where: str) -> np.ndarray:
    row = np.zeros(len(NIH_CLASSES), dtype=np.float32)
    names = [n.strip() for n in finding.split("|") if n.strip()]
    for name in names:
        if name == "No Finding":
            continue
        if name not in NIH_CLASSES:
            raise ProbeDataError(f"{where}: unknown finding {name!r}")
        row[NIH_CLASSES.index(name)] = 1.0
    return row


def _index_images(root: str, pattern: str) -> dict[str, str]:
    """Map file name -> path for every image in root/images*/ (and their images/ subfolders)."""
    index: dict[str, str] = {}
    for folder in sorted(glob.glob(os.path.join(root, "images*"))):
        for sub in (folder, os.path.join(folder, "images")):
            if not os.path.isdir(sub):
                continue
            with os.scandir(sub) as it:
                for entry in it:
                    if entry.name.endswith(pattern) and entry.is_file():
                        index.setdefault(entry.name, entry.path)
    return index


def _read_list(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ProbeDataError(f"{path}: split list missing")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_nih(root: str, split: str) -> ProbeSplit:
    """NIH CXR-14 split 'train' (train_val_list.txt) or 'test' (test_list.txt)."""
    if split not in NIH_SPLIT_FILES:
        raise ProbeDataError(f"NIH split {split!r}: expected one of {sorted(NIH_SPLIT_FILES)}")
    entry = _nih_entry_csv(root)
    with open(entry, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"Image Index", "Finding Labels"} <= set(reader.fieldnames or ()):
            raise ProbeDataError(f"{entry}: needs columns 'Image Index' and 'Finding Labels'")
        findings = {r["Image Index"]: r["Finding Labels"] for r in reader}
    names = _read_list(os.path.join(root, NIH_SPLIT_FILES[split]))
    images = _index_images(root, ".png")
    out = ProbeSplit("nih", split, NIH_CLASSES, [], [], np.zeros((0, len(NIH_CLASSES)), np.float32))
    rows = []
    for name in names:
        if name not in findings:
            out.rejects["not in Data_Entry csv"] += 1
        elif name not in images:
            out.rejects["image file missing"] += 1
        else:
            out.ids.append(name)
            out.paths.append(images[name])
            rows.append(_nih_labels(findings[name], f"{entry}: {name}"))
    if rows:
        out.labels = np.stack(rows)
    _log_rejects(out)
    return out


# ---------------------------------------------------------------- CheXpert


def uncertain_policy(spec: str | None) -> dict[str, str]:
    """'default', one policy for all ('ones'|'zeros'|'ignore'), or 'Edema=ones,Cardiomegaly=zeros'."""
    policy = dict(DEFAULT_UNCERTAIN)
    if not spec or spec == "default":
        return policy
    if spec in UNCERTAIN_POLICIES:
        return {c: spec for c in CHEXPERT_CLASSES}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name not in CHEXPERT_CLASSES or value not in UNCERTAIN_POLICIES:
            raise ProbeDataError(f"uncertain policy {part!r}: expected CLASS=ones|zeros|ignore "
                                 f"with CLASS in {list(CHEXPERT_CLASSES)}")
        policy[name] = value
    return policy


def _chexpert_value(raw: str, policy: str, where: str) -> float:
    raw = raw.strip()
    if raw == "":
        return 0.0  # not mentioned in the report: negative (CheXpert paper)
    try:
        value = float(raw)
    except ValueError:
        raise ProbeDataError(f"{where}: label {raw!r} is not 1, 0, -1 or blank") from None
    if value == -1.0:
        return {"ones": 1.0, "zeros": 0.0, "ignore": float("nan")}[policy]
    if value not in (0.0, 1.0):
        raise ProbeDataError(f"{where}: label {raw!r} is not 1, 0, -1 or blank")
    return value


def _resolve_chexpert(root: str, rel: str) -> str | None:
    """Path column is relative to the dataset folder's parent; accept root = either folder."""
    rel = rel.replace("\\", "/")
    candidates = [os.path.join(root, rel), os.path.join(os.path.dirname(os.path.abspath(root)), rel)]
    head, _, tail = rel.partition("/")
    if tail:
        candidates.append(os.path.join(root, tail))  # root is the CheXpert-v1.0(-small) folder
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def _chexpert_csv(root: str, name: str) -> str:
    for folder in [root] + sorted(glob.glob(os.path.join(root, "CheXpert-v1.0*"))):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ProbeDataError(f"{root}: no {name} (is this the CheXpert root or its parent?)")


def read_chexpert(root: str, split: str, *, uncertain: str | None = None,
                  frontal_only: bool = False) -> ProbeSplit:
    """CheXpert split 'train' (train.csv) or 'test' (valid.csv), the 5 competition labels."""
    if split not in CHEXPERT_SPLIT_FILES:
        raise ProbeDataError(f"CheXpert split {split!r}: expected one of {sorted(CHEXPERT_SPLIT_FILES)}")
    policy = uncertain_policy(uncertain)
    path = _chexpert_csv(root, CHEXPERT_SPLIT_FILES[split])
    base = os.path.dirname(path)
    out = ProbeSplit("chexpert", split, CHEXPERT_CLASSES, [], [],
                     np.zeros((0, len(CHEXPERT_CLASSES)), np.float32))
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"Path", *CHEXPERT_CLASSES} - set(reader.fieldnames or ())
        if missing:
            raise ProbeDataError(f"{path}: missing columns {sorted(missing)}")
        for i, row in enumerate(reader, start=2):
            if frontal_only and row.get("Frontal/Lateral", "Frontal") != "Frontal":
                out.rejects["lateral view (--frontal-only)"] += 1
                continue
            image = _resolve_chexpert(base, row["Path"])
            if image is None:
                out.rejects["image file missing"] += 1
                continue
            where = f"{path}:{i}"
            rows.append([_chexpert_value(row[c], policy[c], where) for c in CHEXPERT_CLASSES])
            out.ids.append(row["Path"])
            out.paths.append(image)
    if rows:
        out.labels = np.asarray(rows, dtype=np.float32)
    _log_rejects(out)
    return out


def read_split(dataset: str, root: str, split: str, **kwargs) -> ProbeSplit:
    if dataset == "nih":
        return read_nih(root, split)
    if dataset == "chexpert":
        return read_chexpert(root, split, **kwargs)
    raise ProbeDataError(f"dataset {dataset!r}: expected nih or chexpert")


def _log_rejects(split: ProbeSplit) -> None:
    for reason, n in sorted(split.rejects.items()):
        log.warning("%s/%s: %d rows skipped: %s", split.dataset, split.split, n, reason)
    if not split.paths:
        raise ProbeDataError(f"{split.dataset}/{split.split}: no usable images "
                             f"({dict(split.rejects) or 'empty list'})")
