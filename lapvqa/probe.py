"""Linear probes of the frozen vision encoder on NIH CXR-14 and CheXpert (the card's table).

    python -m lapvqa.probe --release REL --dataset nih|chexpert --root DIR [--out probe.json]

Features are the encoder's 256 visual tokens mean-pooled to one vector per image, computed once
and cached on disk, keyed by (encoder sha256, dataset, split, image size, the exact image list).
One L2-regularised logistic regression per class (multi-label) is fitted on standardised train
features ('train': NIH train_val_list.txt / CheXpert train.csv) and scored by ROC AUC on 'test'
(NIH test_list.txt / CheXpert valid.csv). A class whose train or test labels take one value only
has no AUC and is reported as n/a, never as 0.5.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import simplejpeg

from lapvqa import probe_data
from lapvqa.release import artifacts
from lapvqa.shard.images import ImageError, MissingCodecError, process_image

log = logging.getLogger("lapvqa.probe")
FEATURE_VERSION = 2  # bump when the pooling or the image preprocessing changes


@dataclass
class ProbeConfig:
    release: str
    dataset: str
    root: str
    out: str | None = None
    cache_dir: str | None = None  # default: $LAPVQA_CACHE/probe or ~/.cache/lapvqa/probe
    encoder: str = "final"  # 'final' = encoder_final.pt, 'best' = model_best.pt's encoder
    uncertain: str = "default"  # CheXpert only: see lapvqa.probe_data
    frontal_only: bool = False  # CheXpert only
    max_train: int | None = None  # random subset of the train split (seeded)
    batch_size: int = 64
    num_workers: int = min(8, os.cpu_count() or 1)
    device: str = "auto"
    C: float = 1.0  # inverse L2 strength of the logistic regression
    max_iter: int = 2000
    seed: int = 0


# ---------------------------------------------------------------- images


def load_image(path: str, size: int) -> np.ndarray:
    """8-bit grayscale [size, size], preprocessed exactly as the training shards were.

    lapvqa.shard's process_image (whole radiograph: longer side to `size`, centred black padding,
    16-bit stretched, the q95 JPEG round trip), so the probe sees images the way the encoder was
    trained on them. Raises ImageError (with a reject reason) for unusable files.
    """
    with open(path, "rb") as f:
        data = f.read()
    jpeg = process_image(data, size=size).jpeg
    return simplejpeg.decode_jpeg(jpeg, colorspace="GRAY")[:, :, 0].copy()


_MISSING_CODEC = "missing_codec: "


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return torch.from_numpy(load_image(self.paths[i], self.size))[None], ""
        except (OSError, ImageError, MissingCodecError) as exc:
            # a bad image is counted by reason; a missing decoder travels to the main process as
            # a reason too (a worker's exception would arrive as a traceback) and stops the probe
            reason = getattr(exc, "reason", "image_unreadable")
            if isinstance(exc, MissingCodecError):
                reason = _MISSING_CODEC + str(exc)
            else:
                log.warning("image rejected %s: %s", self.paths[i], exc)
            return torch.zeros(1, self.size, self.size, dtype=torch.uint8), reason


# ---------------------------------------------------------------- features


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def extract_features(encoder, paths: list[str], size: int, *, batch_size: int = 64,
                     num_workers: int = 0, device: torch.device | None = None):
    """[N, C] float32 mean-pooled encoder tokens and [N] reject reasons ('' = usable image)."""
    device = device or next(encoder.parameters()).device
    loader = torch.utils.data.DataLoader(
        _Images(paths, size), batch_size=batch_size, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False)
    feats, reasons = [], []
    for images, why in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = encoder(images)  # [B, 256, C]
        feats.append(tokens.float().mean(dim=1).cpu().numpy())
        reasons.extend(why)
        missing = [r for r in why if r.startswith(_MISSING_CODEC)]
        if missing:  # every file of that kind would fail: stop, as the sharder does
            raise MissingCodecError(missing[0][len(_MISSING_CODEC):])
    return np.concatenate(feats).astype(np.float32), np.asarray(reasons, dtype=str)


def cache_path(cache_dir: str, encoder_sha: str, split: probe_data.ProbeSplit, size: int) -> str:
    key = hashlib.sha256(json.dumps(
        [FEATURE_VERSION, encoder_sha, split.dataset, split.split, size, split.ids]).encode()
    ).hexdigest()[:20]
    return os.path.join(cache_dir, f"{split.dataset}-{split.split}-{size}px-{key}.npz")


def cached_features(cfg: ProbeConfig, encoder_fn, encoder_sha: str, split, size: int):
    """Features for `split`, from the cache when present; written atomically otherwise."""
    path = cache_path(cfg.cache_dir, encoder_sha, split, size)
    if os.path.isfile(path):
        with np.load(path) as z:
            log.info("features from cache %s", path)
            return z["features"], z["rejected"], True
    feats, rejected = extract_features(encoder_fn(), split.paths, size, batch_size=cfg.batch_size,
                                 num_workers=cfg.num_workers, device=_device(cfg.device))
    os.makedirs(cfg.cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, features=feats, rejected=rejected)
    os.replace(tmp, path)  # a killed run never leaves a half-written cache entry behind
    return feats, rejected, False


# ---------------------------------------------------------------- probe


def fit_probe(x_train, y_train, x_test, y_test, classes, *, C: float = 1.0,
              max_iter: int = 2000, seed: int = 0) -> dict:
    """Per-class AUC of a logistic regression per class; NaN labels are left out of that class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xtr, xte = scaler.transform(x_train), scaler.transform(x_test)
    results = {}
    for j, name in enumerate(classes):
        tr, te = ~np.isnan(y_train[:, j]), ~np.isnan(y_test[:, j])
        ytr, yte = y_train[tr, j], y_test[te, j]
        row = {"auc": None, "train_n": int(tr.sum()), "train_pos": int(ytr.sum()),
               "test_n": int(te.sum()), "test_pos": int(yte.sum())}
        if len(np.unique(ytr)) < 2:
            row["note"] = "train labels take one value"
        elif len(np.unique(yte)) < 2:
            row["note"] = "test labels take one value"
        else:
            clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
            clf.fit(xtr[tr], ytr)
            row["auc"] = float(roc_auc_score(yte, clf.decision_function(xte[te])))
        results[name] = row
    return results


def _subset(split: probe_data.ProbeSplit, n: int | None, seed: int) -> probe_data.ProbeSplit:
    if n is None or n >= len(split):
        return split
    keep = np.sort(np.random.default_rng(seed).choice(len(split), n, replace=False))
    split.ids = [split.ids[i] for i in keep]
    split.paths = [split.paths[i] for i in keep]
    split.labels = split.labels[keep]
    return split


def run_probe(cfg: ProbeConfig) -> dict:
    """Read both splits, extract (or load) features, fit, and return the results dict."""
    cfg.cache_dir = cfg.cache_dir or os.path.join(
        os.environ.get("LAPVQA_CACHE", os.path.expanduser("~/.cache/lapvqa")), "probe")
    model_cfg = artifacts.load_config(cfg.release)
    size = int(model_cfg.image_size)
    weights = artifacts.weights_file(cfg.release, cfg.encoder)
    encoder_sha = artifacts.sha256_file(weights)
    kwargs = ({"uncertain": cfg.uncertain, "frontal_only": cfg.frontal_only}
              if cfg.dataset == "chexpert" else {})
    splits = {s: probe_data.read_split(cfg.dataset, cfg.root, s, **kwargs) for s in ("train", "test")}
    splits["train"] = _subset(splits["train"], cfg.max_train, cfg.seed)
    encoder = None

    def encoder_fn():  # built lazily: a fully cached run never loads the weights
        nonlocal encoder
        if encoder is None:
            encoder = artifacts.load_encoder(cfg.release, cfg.encoder, _device(cfg.device))
        return encoder

    data, cached = {}, {}
    for name, split in splits.items():
        feats, rejected, cached[name] = cached_features(cfg, encoder_fn, encoder_sha, split, size)
        split.rejects.update(r for r in rejected.tolist() if r)
        ok = rejected == ""
        data[name] = (feats[ok], split.labels[ok])
    classes = splits["train"].classes
    per_class = fit_probe(*data["train"], *data["test"], classes, C=cfg.C,
                          max_iter=cfg.max_iter, seed=cfg.seed)
    aucs = [r["auc"] for r in per_class.values() if r["auc"] is not None]
    result = {
        "dataset": cfg.dataset, "release": os.path.abspath(cfg.release),
        "encoder": os.path.basename(weights), "encoder_sha256": encoder_sha, "image_size": size,
        "n_train": len(data["train"][0]), "n_test": len(data["test"][0]),
        "rejects": {s: dict(sp.rejects) for s, sp in splits.items()},
        "features_cached": cached, "classes": per_class,
        "mean_auc": float(np.mean(aucs)) if aucs else None, "classes_scored": len(aucs),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("release", "root", "out")},
    }
    if cfg.dataset == "chexpert":
        result["uncertain_policy"] = probe_data.uncertain_policy(cfg.uncertain)
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['dataset']} linear probe  (train {result['n_train']}, test {result['n_test']})",
             f"{'class':<22}{'AUC':>8}{'test pos/n':>14}"]
    for name, row in result["classes"].items():
        auc = f"{row['auc']:.4f}" if row["auc"] is not None else "n/a"
        lines.append(f"{name:<22}{auc:>8}{row['test_pos']:>8}/{row['test_n']:<6}"
                     + (f" ({row['note']})" if "note" in row else ""))
    mean = f"{result['mean_auc']:.4f}" if result["mean_auc"] is not None else "n/a"
    lines.append(f"{'mean (' + str(result['classes_scored']) + ' classes)':<22}{mean:>8}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lapvqa.probe", description=__doc__.split("\n")[0])
    p.add_argument("--release", required=True, help="release dir (encoder_final.pt, config.json)")
    p.add_argument("--dataset", required=True, choices=["nih", "chexpert"])
    p.add_argument("--root", required=True, help="dataset root as distributed")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--cache-dir")
    p.add_argument("--encoder", choices=["final", "best"], default="final")
    p.add_argument("--uncertain", default="default",
                   help="CheXpert -1 labels: default (U-Ones Atelectasis/Edema, U-Zeros others), "
                        "ones, zeros, ignore, or CLASS=POLICY,...")
    p.add_argument("--frontal-only", action="store_true")
    p.add_argument("--max-train", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=ProbeConfig.num_workers)
    p.add_argument("--device", default="auto")
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = ProbeConfig(**{k: v for k, v in vars(args).items()})
    try:
        result = run_probe(cfg)
    except (probe_data.ProbeDataError, artifacts.ReleaseError, MissingCodecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if cfg.out:
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
