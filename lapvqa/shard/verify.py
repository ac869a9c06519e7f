"""``python -m lapvqa.shard --verify OUT``: re-read every shard against manifest.json.

Checks per shard: size and sha256 as recorded, a readable tar, exactly the members jpg/txt/
tokens.npy/json per sample, the image is a size x size grayscale JPEG that decodes, tokens are
uint16, at most max_tokens and exactly encode(txt), json fields match the key and split, and the
sample count matches. Across shards: unique keys, no patient in two splits, rejects.jsonl agrees
with the manifest. Prints samples per split, token-length percentiles and reject reasons.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import simplejpeg

from ..storage import open_store
from ..tokenizer import encode
from .manifest import FORMAT, MANIFEST, REJECTS
from .summary import format_counts, percentiles, split_table
from .writer import _out_store

__all__ = ["verify", "check_shard", "ShardCheck"]

MEMBERS = {"jpg", "txt", "tokens.npy", "json"}
_JSON_KEYS = {"subject_id", "study_id", "dicom_id", "view", "split", "labels", "orig_size",
              "truncated"}


@dataclass
class ShardCheck:
    name: str
    split: str
    samples: int = 0
    token_lengths: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    subjects: set = field(default_factory=set)
    truncated: int = 0
    problems: list[str] = field(default_factory=list)


def _group(tf: tarfile.TarFile, check: ShardCheck) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for m in tf:
        if not m.isfile():
            check.problems.append(f"{m.name}: not a regular file")
            continue
        base = m.name.rsplit("/", 1)[-1]
        key, _, ext = base.partition(".")
        samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _check_sample(key: str, mem: dict[str, bytes], split: str, size: int, max_tokens: int,
                  check: ShardCheck) -> None:
    if set(mem) != MEMBERS:
        check.problems.append(f"{key}: members {sorted(mem)} != {sorted(MEMBERS)}")
        return
    h, w, cs, _ = simplejpeg.decode_jpeg_header(mem["jpg"])
    img = simplejpeg.decode_jpeg(mem["jpg"], colorspace="GRAY")
    if (h, w) != (size, size) or cs.lower() != "gray" or img.shape[:2] != (size, size):
        check.problems.append(f"{key}: image {h}x{w} {cs}, expected {size}x{size} gray")
    tokens = np.load(io.BytesIO(mem["tokens.npy"]), allow_pickle=False)
    text = mem["txt"].decode("utf-8")
    if tokens.dtype != np.uint16 or tokens.ndim != 1 or len(tokens) > max_tokens:
        check.problems.append(f"{key}: tokens {tokens.dtype} {tokens.shape} (max {max_tokens})")
    elif tokens.tolist() != encode(text):
        check.problems.append(f"{key}: tokens are not encode(txt)")
    meta = json.loads(mem["json"])
    if not _JSON_KEYS <= set(meta) or meta["dicom_id"] != key or meta["split"] != split:
        check.problems.append(f"{key}: json fields/dicom_id/split do not match")
        return
    check.samples += 1
    check.keys.append(key)
    check.subjects.add(meta["subject_id"])
    check.token_lengths.append(int(len(tokens)))
    check.truncated += bool(meta["truncated"])


def check_shard(out_url: str, split: str, entry: dict, size: int, max_tokens: int) -> ShardCheck:
    check = ShardCheck(entry["name"], split)
    store = _out_store(out_url)
    try:
        data = store.read_bytes(entry["name"])
    except (OSError, ValueError) as e:
        check.problems.append(f"cannot read: {e}")
        return check
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        check.problems.append(f"size/sha256 differ from the manifest ({len(data)} bytes)")
        return check
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            samples = _group(tf, check)
        for key, mem in samples.items():
            _check_sample(key, mem, split, size, max_tokens, check)
    except Exception as e:  # a corrupt shard is a finding, not a crash of the verifier
        check.problems.append(f"unreadable: {type(e).__name__}: {e}")
    if check.samples != entry["samples"]:
        check.problems.append(f"{check.samples} valid samples, manifest says {entry['samples']}")
    return check


def _cross_checks(store, manifest: dict, checks: list[ShardCheck]) -> list[str]:
    problems = []
    seen: dict[str, str] = {}
    for c in checks:
        for k in c.keys:
            if k in seen:
                problems.append(f"key {k} in both {seen[k]} and {c.name}")
            seen[k] = c.name
    by_subject = defaultdict(set)
    for c in checks:
        for s in c.subjects:
            by_subject[s].add(c.split)
    leaks = [s for s, sp in by_subject.items() if len(sp) > 1]
    if leaks:
        problems.append(f"{len(leaks)} patient(s) in more than one split, e.g. {leaks[0]}")
    try:
        lines = store.read_bytes(REJECTS).decode().splitlines()
        if len(lines) != manifest["rejects"]["total"]:
            problems.append(f"{REJECTS} has {len(lines)} lines, manifest says "
                            f"{manifest['rejects']['total']}")
    except FileNotFoundError:
        problems.append(f"{REJECTS} missing")
    return problems


def _set_env(env: dict) -> None:
    os.environ.clear()
    os.environ.update(env)


def verify(out_url: str, workers: int = 1, file=None) -> int:
    file = file or sys.stdout
    store = open_store(out_url)
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except FileNotFoundError:
        print(f"verify: error: no {MANIFEST} in {store.url('')} (run not finished?)", file=sys.stderr)
        return 1
    if manifest.get("format") != FORMAT:
        print(f"verify: error: {store.url(MANIFEST)} is not a {FORMAT} manifest", file=sys.stderr)
        return 1
    size, max_tokens = manifest["settings"]["size"], manifest["settings"]["max_tokens"]
    args = [(out_url, split, e, size, max_tokens)
            for split, v in manifest["splits"].items() for e in v["shards"]]
    if workers > 1 and len(args) > 1:
        from .runner import _mp_context

        mpc = _mp_context(out_url.startswith("s3://"))
        with ProcessPoolExecutor(min(workers, len(args)), mp_context=mpc, initializer=_set_env,
                                 initargs=(dict(os.environ),)) as ex:
            checks = list(ex.map(check_shard, *zip(*args)))
    else:
        checks = [check_shard(*a) for a in args]
    problems = [f"{c.name}: {p}" for c in checks for p in c.problems]
    problems += _cross_checks(store, manifest, checks)
    _report(manifest, checks, file)
    for p in problems[:50]:
        print(f"PROBLEM {p}", file=file)
    verdict = "OK" if not problems else f"FAILED ({len(problems)} problems)"
    print(f"verify {store.url('')}: {verdict}", file=file)
    return 0 if not problems else 1


def _report(manifest: dict, checks: list[ShardCheck], file) -> None:
    rows = {}
    for split in manifest["splits"]:
        cs = [c for c in checks if c.split == split]
        rows[split] = (len(cs), sum(c.samples for c in cs),
                       sum(e["bytes"] for e in manifest["splits"][split]["shards"]))
    print(split_table(rows), file=file)
    for split in manifest["splits"]:
        lens = [n for c in checks if c.split == split for n in c.token_lengths]
        trunc = sum(c.truncated for c in checks if c.split == split)
        if lens:
            pct = ", ".join(f"{k} {v}" for k, v in percentiles(lens).items())
            print(f"tokens {split}: {pct}; truncated {trunc}", file=file)
    rej = manifest["rejects"]
    print(f"rejects: {rej['total']} ({format_counts(rej['by_reason'])})", file=file)
