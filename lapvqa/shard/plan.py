"""The plan: which image goes into which shard, decided up front from the CSVs alone.

Every task of a SLURM array (and every worker count) computes the same plan from the same inputs
and settings, which is what makes the output byte-identical and lets any task finish the
manifest. Rejects that need no file access (ids, splits, duplicates) are decided here too.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass

from .config import FRONTAL_VIEWS, ShardConfig
from .inputs import SPLITS, InputError, Inputs, Record

__all__ = ["ShardJob", "Plan", "build_plan", "reject_entry", "SAFE_KEY"]

# WebDataset splits keys at the first dot and tar names must stay portable: the key (dicom_id)
# must be a plain token. MIMIC's dicom_ids (8-8-8-8-8 hex groups) all pass.
SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")


@dataclass
class ShardJob:
    name: str  # e.g. "train-000012.tar"
    split: str
    index: int  # position in the global job list (task assignment: index % num_tasks)
    records: list[Record]


@dataclass
class Plan:
    jobs: list[ShardJob]
    rejects: list[dict]  # decided without opening files
    skipped_view: int  # images outside --views (not rejects: a choice)
    listed: int  # image rows read from the CSVs
    plan_hash: str

    def for_task(self, task_index: int, num_tasks: int) -> list[ShardJob]:
        return [j for j in self.jobs if j.index % num_tasks == task_index]


def reject_entry(rec: Record | None, reason: str, detail: str = "", **extra) -> dict:
    out = {"dicom_id": rec.dicom_id, "subject_id": rec.subject_id, "study_id": rec.study_id,
           "split": rec.split, "path": rec.image} if rec else {}
    out.update(extra)
    out["reason"] = reason
    if detail:
        out["detail"] = detail
    return out


def _screen(records: list[Record], rejects: list[dict]) -> list[Record]:
    """Drop duplicate/unsafe ids and rows without a split; count each as a reject."""
    seen: set[str] = set()
    kept = []
    for r in records:
        if not SAFE_KEY.fullmatch(r.dicom_id):
            rejects.append(reject_entry(r, "unsafe_id", "dicom_id is not a safe tar key name"))
        elif r.dicom_id in seen:
            rejects.append(reject_entry(r, "duplicate_dicom_id"))
        elif r.split not in SPLITS:
            rejects.append(reject_entry(r, "no_split", f"split={r.split!r}" if r.split else ""))
        else:
            seen.add(r.dicom_id)
            kept.append(r)
    return kept


def _patients_in_two_splits(records: list[Record], rejects: list[dict]) -> list[Record]:
    """A patient in two splits would leak between train and evaluation: reject all their images."""
    splits = defaultdict(set)
    for r in records:
        splits[r.subject_id].add(r.split)
    bad = {s for s, sp in splits.items() if len(sp) > 1}
    for r in records:
        if r.subject_id in bad:
            rejects.append(reject_entry(r, "patient_in_two_splits",
                                        "splits " + ",".join(sorted(splits[r.subject_id]))))
    return [r for r in records if r.subject_id not in bad]


def _order(records: list[Record], split: str, seed: int) -> list[Record]:
    # String seeds are hashed with SHA-512 by random.seed: stable across runs and platforms.
    rs = sorted(records, key=lambda r: r.dicom_id)
    random.Random(f"lapvqa-shard:{seed}:{split}").shuffle(rs)
    return rs


def _hash(cfg: ShardConfig, inputs: Inputs, jobs: list[ShardJob]) -> str:
    # Where reports come from (folder or zip) is left out: both give the same bytes.
    h = hashlib.sha256()
    h.update(json.dumps({"settings": cfg.settings(), "kind": inputs.kind}, sort_keys=True).encode())
    for j in jobs:
        h.update(f"\n#{j.name}".encode())
        for r in j.records:
            h.update(json.dumps([r.dicom_id, r.subject_id, r.study_id, r.split, r.view,
                                 list(r.labels), r.image]).encode())
    return h.hexdigest()


def build_plan(inputs: Inputs, cfg: ShardConfig) -> Plan:
    rejects = list(inputs.rejects)
    records = sorted(inputs.records, key=lambda r: (r.subject_id, r.study_id, r.dicom_id, r.image))
    listed = len(records) + len(rejects)
    if cfg.limit:
        records = records[: cfg.limit]
    records = _patients_in_two_splits(_screen(records, rejects), rejects)
    skipped = 0
    if cfg.views == "frontal":
        if records and not any(r.view for r in records):
            raise InputError("--views frontal needs ViewPosition: pass --metadata with "
                             "MIMIC-CXR-JPG's mimic-cxr-2.0.0-metadata.csv[.gz]")
        kept = [r for r in records if r.view.upper() in FRONTAL_VIEWS]
        skipped, records = len(records) - len(kept), kept
    jobs: list[ShardJob] = []
    for split in SPLITS:
        ordered = _order([r for r in records if r.split == split], split, cfg.seed)
        n = cfg.samples_per_shard
        for i in range(0, len(ordered), n):
            jobs.append(ShardJob(f"{split}-{i // n:06d}.tar", split, len(jobs), ordered[i:i + n]))
    return Plan(jobs, rejects, skipped, listed, _hash(cfg, inputs, jobs))
