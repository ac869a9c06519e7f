"""The sharder's manifest.json: which shards a split has, how many samples each holds."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from lapvqa.storage import Store, open_store


class DataError(RuntimeError):
    """Data that cannot be trained on (missing manifest, too many corrupt samples, ...)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the manifest's location
    samples: int
    bytes: int = 0
    sha256: str = ""


@dataclass
class Manifest:
    url: str
    splits: dict[str, list[ShardInfo]]
    settings: dict
    sha256: str = ""  # of manifest.json's bytes as read: the run's data provenance (checkpoints, card)

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise DataError(f"{self.url}/manifest.json has no split {split!r} "
                            f"(splits: {', '.join(sorted(self.splits)) or 'none'})")
        shards = self.splits[split]
        if not shards:
            raise DataError(f"{self.url}/manifest.json: split {split!r} has no shards")
        return shards


def load_manifest(url: str) -> tuple[Store, Manifest]:
    """Open the shard store at ``url`` (folder or s3://) and parse its manifest.json."""
    store = open_store(url)
    if not store.exists("manifest.json"):
        raise DataError(f"no manifest.json in {url}: point data.shards at the sharder's output "
                        "(python -m lapvqa.shard writes manifest.json last, when it is complete)")
    raw = store.read_bytes("manifest.json")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{url}/manifest.json is not valid JSON: {e}") from None
    if doc.get("format") != "lapvqa-shards" or doc.get("format_version") != 1:
        raise DataError(f"{url}/manifest.json: format {doc.get('format')!r} "
                        f"v{doc.get('format_version')!r}, expected 'lapvqa-shards' v1")
    splits = {}
    for split, entry in (doc.get("splits") or {}).items():
        splits[split] = [ShardInfo(s["name"], int(s["samples"]), int(s.get("bytes", 0)),
                                   s.get("sha256", "")) for s in entry.get("shards", [])]
    return store, Manifest(url=url, splits=splits, settings=doc.get("settings") or {},
                           sha256=hashlib.sha256(raw).hexdigest())
