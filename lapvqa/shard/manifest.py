"""Completing an output: rejects.jsonl, then manifest.json (always last) from the shard sidecars.

Any task may finalize: each task writes its shards' sidecars first and then checks whether every
planned shard has one; the task whose check sees all of them writes the manifest (two tasks doing
so at once write the same bytes, atomically). ``--finalize`` runs only this step.
"""

from __future__ import annotations

import json
import platform
import time

from .. import __version__
from ..storage import Store
from .inputs import SPLITS, Inputs
from .plan import Plan
from .writer import PARTS_DIR, ShardResult, sidecar_name

__all__ = ["MANIFEST", "REJECTS", "PLAN_FILE", "collect", "finalize", "check_plan_file",
           "FORMAT", "FORMAT_VERSION"]

MANIFEST, REJECTS = "manifest.json", "rejects.jsonl"
PLAN_FILE = f"{PARTS_DIR}/plan.json"
FORMAT, FORMAT_VERSION = "lapvqa-shards", 1


class PlanMismatch(ValueError):
    pass


def check_plan_file(store: Store, plan: Plan, settings: dict, overwrite: bool) -> None:
    """Refuse to mix shards of different inputs/settings in one output location."""
    try:
        old = json.loads(store.read_bytes(PLAN_FILE))
    except (FileNotFoundError, NotADirectoryError, ValueError):  # absent; writing will tell
        old = None
    if old is not None and old.get("plan_hash") != plan.plan_hash and not overwrite:
        changed = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
        what = f"settings differ: {', '.join(changed)}" if changed else "inputs differ"
        raise PlanMismatch(f"{store.url('')} holds shards of another plan ({what}); "
                           "use a new --out, or --overwrite to replace them")
    if old is None or old.get("plan_hash") != plan.plan_hash:
        if overwrite:
            store.delete(MANIFEST)  # the old manifest no longer describes this location
        body = {"plan_hash": plan.plan_hash, "settings": settings,
                "shards": [j.name for j in plan.jobs]}
        store.write_bytes_atomic(PLAN_FILE, json.dumps(body, indent=1, sort_keys=True).encode())


def collect(store: Store, plan: Plan, known: dict[str, ShardResult] | None = None,
            stop_at_missing: bool = True) -> tuple[list[ShardResult], list[str]]:
    """Results of all planned shards (from ``known`` or the sidecars) and the missing names."""
    known = known or {}
    results, missing = [], []
    for job in plan.jobs:
        res = known.get(job.name)
        if res is None:
            try:
                side = json.loads(store.read_bytes(sidecar_name(job.name)))
                if side.get("plan_hash") == plan.plan_hash:
                    res = ShardResult.from_sidecar(side)
            except (FileNotFoundError, ValueError):
                pass
        if res is None:
            missing.append(job.name)
            if stop_at_missing:
                break
        else:
            results.append(res)
    return results, missing


def _size(store: Store, name: str) -> int:
    try:
        return store.size(name)
    except FileNotFoundError:
        return -1


def _counts(items) -> dict:
    out: dict[str, int] = {}
    for k in items:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def build_manifest(plan: Plan, results: list[ShardResult], settings: dict, inputs: Inputs,
                   rejects: list[dict]) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [{"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256}
                  for r in results if r.split == split and r.samples]
        splits[split] = {"shards": shards, "samples": sum(s["samples"] for s in shards),
                         "bytes": sum(s["bytes"] for s in shards)}
    warnings: dict[str, int] = {}
    for r in results:
        for k, v in r.warnings.items():
            warnings[k] = warnings.get(k, 0) + v
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lapvqa_version": __version__,
        "created_by": {"tool": "python -m lapvqa.shard", "lapvqa_version": __version__,
                       "python": platform.python_version(),
                       "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "settings": {**settings, "input_kind": inputs.kind, "split_source": inputs.split_source,
                     "labels_source": inputs.labels_source, "plan_hash": plan.plan_hash,
                     "images_listed": plan.listed, "skipped_by_views": plan.skipped_view,
                     "tokenizer": "gpt2 (tiktoken, offline)",
                     "image_policy": "longer side to size, centred on black square"},
        "splits": splits,
        "rejects": {"total": len(rejects), "by_reason": _counts(r["reason"] for r in rejects)},
        "warnings": {"total": sum(warnings.values()), "by_reason": dict(sorted(warnings.items()))},
    }


def finalize(store: Store, plan: Plan, settings: dict, inputs: Inputs,
             known: dict[str, ShardResult] | None = None) -> tuple[dict | None, list[str]]:
    """Write rejects.jsonl then manifest.json if every planned shard is done."""
    results, missing = collect(store, plan, known)
    if missing:
        return None, missing
    for r in results:  # cheap existence/size check of shards other tasks wrote
        if r.samples and r.name not in (known or {}) and _size(store, r.name) != r.bytes:
            return None, [r.name]
    rejects = list(plan.rejects) + [x for r in results for x in r.rejects]
    lines = "".join(json.dumps(x, sort_keys=True) + "\n" for x in rejects)
    store.write_bytes_atomic(REJECTS, lines.encode())
    manifest = build_manifest(plan, results, settings, inputs, rejects)
    store.write_bytes_atomic(MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n")
    return manifest, []
