"""Small shard sets for the trainer/data tests, built once per test session.

``write_shards(root, ...)`` writes WebDataset shards exactly in the DESIGN.md format (384x384
grayscale JPEG, txt, uint16 tokens.npy, json) plus manifest.json, with image-conditioned reports
(a bright blob on the left/right/none <-> "left/right/no opacity") so a tiny model has something
to learn. Pytest fixtures:

    train_shards   -> str, shards made by the real sharder from a MIMIC-shaped tree (session scope)
    tiny_config    -> function(run_dir, shards, **overrides) -> path of a YAML config for tests
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import yaml

from lapvqa.tokenizer import encode

REPO = Path(__file__).resolve().parent.parent
FINDINGS = {
    "left": "FINDINGS: There is a focal opacity in the left lower lung. IMPRESSION: Left opacity.",
    "right": "FINDINGS: There is a focal opacity in the right lower lung. IMPRESSION: Right opacity.",
    "none": "FINDINGS: The lungs are clear. No focal opacity. IMPRESSION: No acute process.",
}


def _image(rng: np.random.Generator, where: str, size: int = 384) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    img = 60 + 40 * np.exp(-(((xx - size / 2) / (size / 3)) ** 2 + ((yy - size / 2) / (size / 2.5)) ** 2))
    img = img + rng.normal(0, 6, (size, size))
    if where != "none":
        cx = size * (0.70 if where == "left" else 0.30)  # patient's left is the viewer's right
        cy = size * rng.uniform(0.55, 0.7)
        img += 120 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size / 12) ** 2)))
    return np.clip(img, 0, 255).astype(np.uint8)


def _sample(rng: np.random.Generator, split: str, index: int) -> tuple[str, dict]:
    where = ("left", "right", "none")[index % 3]
    subject, study = 10000000 + index, 50000000 + index
    dicom = hashlib.sha1(f"{split}-{index}".encode()).hexdigest()[:32]
    text = FINDINGS[where]
    tokens = np.asarray(encode(text), dtype=np.uint16)
    buf = io.BytesIO()
    np.save(buf, tokens)
    meta = {"subject_id": subject, "study_id": study, "dicom_id": dicom, "view": "PA",
            "split": split, "labels": {"Lung Opacity": 0.0 if where == "none" else 1.0},
            "orig_size": [384, 384], "truncated": False}
    key = f"p{subject}_s{study}_{dicom}"
    jpg = simplejpeg.encode_jpeg(_image(rng, where)[:, :, None], quality=90, colorspace="GRAY")
    return key, {"jpg": jpg, "txt": text.encode(), "tokens.npy": buf.getvalue(),
                 "json": json.dumps(meta).encode()}


def _write_tar(path: Path, samples: list[tuple[str, dict]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))


def write_shards(root: str | os.PathLike, counts: dict | None = None, per_shard: int = 24,
                 seed: int = 0) -> str:
    """Shards + manifest.json under ``root``; counts = samples per split."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = counts or {"train": 150, "validate": 30}
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in counts.items():
        entries = []
        for s, start in enumerate(range(0, n, per_shard)):
            name = f"{split}-{s:06d}.tar"
            _write_tar(root / name, [_sample(rng, split, i) for i in range(start, min(n, start + per_shard))])
            data = (root / name).read_bytes()
            entries.append({"name": name, "samples": min(n, start + per_shard) - start,
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"shards": entries, "samples": n, "bytes": sum(e["bytes"] for e in entries)}
    manifest = {"format": "lapvqa-shards", "format_version": 1, "lapvqa_version": "test",
                "created_by": {"tool": "tests/train_fixtures.py"},
                "settings": {"size": 384, "samples_per_shard": per_shard, "seed": seed},
                "splits": splits, "rejects": {"total": 0, "by_reason": {}}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return str(root)


def shard_mimic_tree(root: str | os.PathLike, n_studies: int = 64, per_shard: int = 16) -> str:
    """The real path: a MIMIC-CXR-JPG-shaped tree (tests/mimic_fixtures.py) through the real
    sharder (python -m lapvqa.shard); returns the output folder."""
    from lapvqa.shard import main as shard_main
    from mimic_fixtures import write_mimic_jpg_tree

    root = Path(root)
    tree = write_mimic_jpg_tree(root / "mimic", n_studies=n_studies, images_per_study=2)
    out = root / "shards"
    code = shard_main(["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
                       "--out", str(out), "--samples-per-shard", str(per_shard), "--workers", "1",
                       "--no-progress"])
    assert code == 0, f"lapvqa.shard failed with {code}"
    return str(out)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> str:
    """Real shards (sharder output): 64 train samples in 4 shards, 32 validate in 2, 32 test."""
    return shard_mimic_tree(tmp_path_factory.mktemp("train_shards"))


def write_config(path: str | os.PathLike, run_dir: str, shards: str, **overrides) -> str:
    """configs/tiny.yaml, shrunk for tests, with dotted-key overrides (``train__max_steps=4``)."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    test = {"run.dir": run_dir, "data.shards": shards, "model.image_size": 64,
            "train.max_steps": 12, "train.micro_batch_size": 4, "train.warmup_steps": 2,
            "data.num_workers": 1, "data.shuffle_buffer": 16, "data.prefetch_factor": 2,
            "validate.num_workers": 1, "run.progress": False}
    test.update({k.replace("__", "."): v for k, v in overrides.items()})
    for key, value in test.items():
        section, _, name = key.partition(".")
        if name:
            cfg.setdefault(section, {})[name] = value
        else:
            cfg[section] = value
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)
