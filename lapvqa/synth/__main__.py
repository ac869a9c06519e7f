"""``python -m lapvqa.synth --out DIR [--studies N] [--seed S] ...``: write a synthetic set."""

from __future__ import annotations

import argparse
import sys

from lapvqa.synth.cohort import FULL_SIZE, SynthConfig
from lapvqa.synth.phrases import FINDING_KEYS
from lapvqa.synth.writer import synthesize

_D = SynthConfig(out="")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lapvqa.synth",
        description="Write a synthetic MIMIC-CXR-JPG-shaped tree (images, reports, metadata/"
                    "split/CheXpert CSVs) whose findings are visible in the images and stated in "
                    "the reports.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--studies", type=int, default=_D.studies)
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--findings", default=",".join(_D.findings),
                   help=f"comma-separated findings that can occur ({', '.join(FINDING_KEYS)})")
    p.add_argument("--prevalence", type=float, default=_D.prevalence,
                   help="per finding, independently")
    p.add_argument("--min-size", type=int, default=_D.min_size, help="shortest longer-side, px")
    p.add_argument("--max-size", type=int, default=_D.max_size, help="longest longer-side, px")
    p.add_argument("--full-size", action="store_true",
                   help=f"MIMIC-sized images (longer side {FULL_SIZE[0]}-{FULL_SIZE[1]} px)")
    p.add_argument("--lateral-rate", type=float, default=_D.lateral_rate)
    p.add_argument("--ap-rate", type=float, default=_D.ap_rate)
    p.add_argument("--uncertain-rate", type=float, default=_D.uncertain_rate,
                   help="present findings the report only hedges about (CheXpert -1)")
    p.add_argument("--omit-negative-rate", type=float, default=_D.omit_negative_rate,
                   help="absent findings the report does not mention (CheXpert blank)")
    p.add_argument("--impression-only-rate", type=float, default=_D.impression_only_rate)
    p.add_argument("--odd-layout-rate", type=float, default=_D.odd_layout_rate,
                   help="old-style, free-text and wet-read reports")
    p.add_argument("--variety", choices=("full", "low"), default=_D.variety,
                   help="report wording: the realistic mix, or one fixed sentence per finding "
                        "state (what a tiny model learns in minutes on a CPU)")
    p.add_argument("--split", default=",".join(str(x) for x in _D.split),
                   help="train,validate,test fractions (whole patients)")
    p.add_argument("--reports", choices=("tree", "zip", "both"), default=_D.reports,
                   help="reports as files/.../sNNN.txt, as mimic-cxr-reports.zip, or both")
    p.add_argument("--jpeg-quality", type=int, default=_D.jpeg_quality)
    p.add_argument("--workers", type=int, default=0, help="render processes (0 = one per core)")
    p.add_argument("--force", action="store_true", help="replace a tree this command wrote before")
    return p


def config_from_args(a: argparse.Namespace) -> SynthConfig:
    lo, hi = FULL_SIZE if a.full_size else (a.min_size, a.max_size)
    try:
        split = tuple(float(x) for x in a.split.split(","))
    except ValueError:
        raise ValueError(f"--split {a.split!r}: expected three numbers like 0.8,0.1,0.1") from None
    return SynthConfig(
        out=a.out, studies=a.studies, seed=a.seed,
        findings=tuple(x.strip() for x in a.findings.split(",") if x.strip()),
        prevalence=a.prevalence, min_size=lo, max_size=hi, lateral_rate=a.lateral_rate,
        ap_rate=a.ap_rate, uncertain_rate=a.uncertain_rate, omit_negative_rate=a.omit_negative_rate,
        impression_only_rate=a.impression_only_rate, odd_layout_rate=a.odd_layout_rate,
        variety=a.variety, split=split, reports=a.reports, jpeg_quality=a.jpeg_quality,
        workers=a.workers, force=a.force)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = synthesize(config_from_args(args))
    except (ValueError, FileExistsError) as e:
        print(f"lapvqa.synth: error: {e}", file=sys.stderr)
        return 2
    prev = ", ".join(f"{k} {v:.0%}" for k, v in summary.prevalence.items())
    splits = ", ".join(f"{k} {v}" for k, v in summary.by_split.items())
    print(f"wrote {summary.images} images / {summary.studies} studies / {summary.patients} "
          f"patients to {summary.out} in {summary.seconds:.1f} s\n  studies by split: {splits}\n"
          f"  prevalence: {prev}\n  shard it: python -m lapvqa.shard --images {summary.out} "
          f"--reports {summary.out} --out SHARDS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
