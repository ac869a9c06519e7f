"""python -m lapvqa.consolidate RUN_DIR --out RELEASE_DIR [--best-tag TAG] [--safetensors]

Writes model_best.pt (best validation loss), encoder_final.pt (last complete checkpoint),
config.json, SHA256SUMS and MODEL_CARD.md; see lapvqa.release.consolidate for the stages.
Refuses (one line, exit 2) an incomplete or mismatched checkpoint and a non-empty --out.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lapvqa.release.artifacts import ReleaseError
from lapvqa.release.consolidate import ConsolidateConfig, consolidate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lapvqa.consolidate",
                                description="DeepSpeed run dir -> released model files")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="release folder (must not exist or be empty)")
    p.add_argument("--best-tag", help="checkpoint tag for model_best.pt (default: best.json)")
    p.add_argument("--safetensors", action="store_true", help="also write .safetensors copies")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = consolidate(ConsolidateConfig(args.run_dir, args.out, args.best_tag, args.safetensors))
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: model_best.pt <- {s['best_tag']}, encoder_final.pt <- {s['last_tag']}; "
          f"fp32 model {s['fp32_gib']:.3f} GiB, peak RSS {s['rss_peak_gib']:.3f} GiB "
          f"(at start {s['rss_start_gib']:.3f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
