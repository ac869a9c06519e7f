"""Offline sharder: MIMIC-CXR(-JPG) + reports -> WebDataset shards + manifest.json + rejects.jsonl.

``python -m lapvqa.shard --images ROOT --reports ROOT_OR_ZIP --out DIR_OR_S3`` (see
docs/sharding.md); ``main(argv)`` is the same entry point for tests and scripts.
"""

from .cli import main
from .config import RunOptions, ShardConfig

__all__ = ["main", "ShardConfig", "RunOptions"]
