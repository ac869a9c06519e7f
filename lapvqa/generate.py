"""Generate reports with a released model, and score them against the references.

    python -m lapvqa.generate --release REL --shards DIR_OR_S3 --split test --out reports.jsonl
    python -m lapvqa.generate --release REL --out reports.jsonl a.jpg b.png c.dcm ...

Shards are read through their manifest.json (local folder or s3://, lapvqa.storage), one sample
per image; each output row holds ``dicom_id``, ``generated`` and ``reference`` (the shard's report
text, or null for loose image files). With references, BLEU-1..4, ROUGE-L and CIDEr
(:mod:`lapvqa.textmetrics`, coco-caption definitions) are printed and, with ``--metrics``, saved.
Loose images go through the sharder's preprocessing (JPEG/PNG/DICOM, whole radiograph padded
square), so they reach the model exactly as the training images did.
The output is written to ``OUT.partial`` and renamed when complete: a finished file is never partial.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
import torch
from PIL import Image

from lapvqa import textmetrics
from lapvqa.data.manifest import DataError, load_manifest
from lapvqa.release import artifacts
from lapvqa.shard.images import ImageError, MissingCodecError, process_image
from lapvqa.tokenizer import decode

log = logging.getLogger("lapvqa.generate")
MEMBERS = ("jpg", "txt", "json")


@dataclass
class GenerateConfig:
    release: str
    out: str
    shards: str | None = None
    split: str = "test"
    images: list[str] = field(default_factory=list)
    batch_size: int = 32
    num_beams: int = 1
    max_new_tokens: int | None = None  # default: the shards' max_tokens + 1 (EOT), else 128
    length_penalty: float = 1.0
    limit: int | None = None
    device: str = "auto"
    metrics: str | None = None


@dataclass
class Item:
    image: np.ndarray  # uint8 [S, S]
    row: dict  # everything but "generated"


# ---------------------------------------------------------------- inputs


def _fit(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape != (size, size):  # shards made at another size than this model's input
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.LANCZOS))
    return arr


def _tar_samples(store, shard: str) -> Iterator[dict]:
    """{__key__, jpg, txt, json} per sample of one WebDataset tar, in order (streamed)."""
    current: dict | None = None
    with store.open_read(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            dot = base.find(".")
            key = info.name[: len(info.name) - len(base) + dot] if dot >= 0 else info.name
            member = base[dot + 1:] if dot >= 0 else ""
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            current = current or {"__key__": key}
            if member in MEMBERS:
                current[member] = tar.extractfile(info).read()
    if current is not None:
        yield current


def shard_items(url: str, split: str, size: int, rejects: dict) -> Iterator[Item]:
    store, manifest = load_manifest(url)
    for shard in manifest.shards(split):
        try:
            for s in _tar_samples(store, shard.name):
                if "jpg" not in s:
                    rejects["sample without jpg"] = rejects.get("sample without jpg", 0) + 1
                    continue
                meta = json.loads(s["json"]) if "json" in s else {}
                image = simplejpeg.decode_jpeg(s["jpg"], colorspace="GRAY")[:, :, 0]
                row = {"key": s["__key__"], "dicom_id": meta.get("dicom_id", s["__key__"]),
                       "study_id": meta.get("study_id"), "subject_id": meta.get("subject_id"),
                       "reference": s["txt"].decode("utf-8") if "txt" in s else None}
                yield Item(_fit(image, size), row)
        except (tarfile.TarError, OSError, ValueError) as exc:
            # a damaged shard is reported by name and counted; the samples before it are kept
            log.error("shard %s unreadable: %s: %s", shard.name, type(exc).__name__, exc)
            rejects["unreadable shard"] = rejects.get("unreadable shard", 0) + 1


def file_items(paths: list[str], size: int, rejects: dict) -> Iterator[Item]:
    for path in paths:
        try:
            with open(path, "rb") as f:
                jpeg = process_image(f.read(), size=size).jpeg
        except (OSError, ImageError) as exc:
            log.error("image %s rejected: %s", path, exc)
            reason = getattr(exc, "reason", "image_unreadable")
            rejects[reason] = rejects.get(reason, 0) + 1
            continue
        image = simplejpeg.decode_jpeg(jpeg, colorspace="GRAY")[:, :, 0]
        stem = os.path.splitext(os.path.basename(path))[0]
        yield Item(image, {"path": path, "dicom_id": stem, "reference": None})


def _batches(items: Iterator[Item], size: int, limit: int | None) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            break
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- generation


def trim(ids: list[int], eot: int) -> list[int]:
    """Report tokens up to (not including) the first EOT."""
    return ids[: ids.index(eot)] if eot in ids else ids


@torch.no_grad()
def generate_batch(model, images: np.ndarray, cfg: GenerateConfig, device: torch.device) -> list[str]:
    x = torch.from_numpy(images)[:, None].to(device)  # uint8 [B, 1, S, S]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        ids = model.generate(x, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                             length_penalty=cfg.length_penalty)
    eot = model.config.eot_id
    return [decode(trim(row, eot)) for row in ids.tolist()]


def _max_new_tokens(cfg: GenerateConfig, model_config) -> int:
    n = cfg.max_new_tokens
    if n is None and cfg.shards:
        _, manifest = load_manifest(cfg.shards)
        max_tokens = manifest.settings.get("max_tokens")
        n = int(max_tokens) + 1 if max_tokens else None  # + the closing EOT
    n = n or 128
    return max(1, min(n, model_config.max_positions - 1))  # the leading EOT takes a position


def run_generate(cfg: GenerateConfig) -> dict:
    """Write the JSONL and return {"rows", "rejects", "metrics" (None without references)}."""
    if bool(cfg.shards) == bool(cfg.images):
        raise artifacts.ReleaseError("give either --shards (with --split) or image files, not both")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    model = artifacts.load_model(cfg.release, device)
    cfg.max_new_tokens = _max_new_tokens(cfg, model.config)
    size, rejects = model.config.image_size, {}
    items = (shard_items(cfg.shards, cfg.split, size, rejects) if cfg.shards
             else file_items(cfg.images, size, rejects))
    refs, hyps, n = [], [], 0
    tmp = cfg.out + ".partial"
    with open(tmp, "w", encoding="utf-8") as out:
        for batch in _batches(items, cfg.batch_size, cfg.limit):
            texts = generate_batch(model, np.stack([it.image for it in batch]), cfg, device)
            for item, text in zip(batch, texts):
                row = {**item.row, "generated": text}
                out.write(json.dumps(row) + "\n")
                if row["reference"] is not None:
                    refs.append(row["reference"])
                    hyps.append(text)
            n += len(batch)
            out.flush()
            log.info("%d reports generated", n)
    os.replace(tmp, cfg.out)
    metrics = textmetrics.compute_metrics(refs, hyps) if refs else None
    return {"rows": n, "rejects": rejects, "metrics": metrics, "with_reference": len(refs)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lapvqa.generate", description=__doc__.split("\n")[0])
    p.add_argument("--release", required=True, help="release dir (model_best.pt, config.json)")
    p.add_argument("--shards", help="shard folder or s3://bucket/prefix holding manifest.json")
    p.add_argument("--split", default="test")
    p.add_argument("images", nargs="*", help="image files (JPEG/PNG/DICOM) instead of --shards")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--device", default="auto")
    p.add_argument("--metrics", help="also write the metrics JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = GenerateConfig(**vars(args))
    try:
        result = run_generate(cfg)
    except (artifacts.ReleaseError, DataError, MissingCodecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result['rows']} reports -> {cfg.out}"
          + (f" ({sum(result['rejects'].values())} inputs rejected: {result['rejects']})"
             if result["rejects"] else ""))
    if result["metrics"]:
        print(f"vs {result['with_reference']} references: "
              + textmetrics.format_metrics(result["metrics"]))
    if cfg.metrics:
        with open(cfg.metrics, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
