"""Plot a run to PNG: ``python -m lapvqa.plot RUN_DIR --out run.png``.

Panels: train loss (+ validation loss), learning rate, grad norm, throughput (images/s) and
data-wait fraction, all against the optimizer step; read from RUN_DIR/metrics.jsonl only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of RUN_DIR/metrics.jsonl; a torn last line is ignored."""
    train, val = [], []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        (val if "val_loss" in row else train).append(row)
    return train, val


def _series(rows: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0][0]
    ax.plot(*_series(train, "loss"), lw=1, label="train loss")
    if val:
        ax.plot(*_series(val, "val_loss"), "o-", label="val loss (token-weighted)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    axes[0][1].plot(*_series(train, "lr"))
    axes[0][1].set_ylabel("learning rate")
    axes[1][0].plot(*_series(train, "grad_norm"))
    axes[1][0].set_ylabel("grad norm (before clipping)")
    ax = axes[1][1]
    ax.plot(*_series(train, "images_per_s"), label="images/s")
    ax.set_ylabel("images/s (global)")
    twin = ax.twinx()
    twin.plot(*_series(train, "data_wait"), color="tab:red", lw=0.8, label="data wait")
    twin.set_ylabel("data-wait fraction", color="tab:red")
    twin.set_ylim(0, 1)
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lapvqa.plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        print(f"lapvqa.plot: no metrics.jsonl in {args.run_dir}", file=sys.stderr)
        return 2
    out = plot_run(args.run_dir, args.out or Path(args.run_dir) / "metrics.png")
    print(out)
    return 0
