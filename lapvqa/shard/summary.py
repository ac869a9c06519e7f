"""Human-readable tables for the end of a run and for --verify."""

from __future__ import annotations

import sys

import numpy as np

from .inputs import SPLITS

__all__ = ["print_summary", "percentiles", "format_counts", "split_table"]


def percentiles(values, qs=(50, 90, 99)) -> dict:
    if not len(values):
        return {}
    a = np.asarray(values)
    out = {f"p{q}": int(np.percentile(a, q, method="nearest")) for q in qs}
    out.update(min=int(a.min()), max=int(a.max()), mean=round(float(a.mean()), 1))
    return out


def format_counts(counts: dict) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def split_table(rows: dict[str, tuple[int, int, int]]) -> str:
    """rows: split -> (shards, samples, bytes)."""
    lines = [f"{'split':<10} {'shards':>7} {'samples':>9} {'MB':>10}"]
    tot = [0, 0, 0]
    for split in SPLITS:
        s = rows.get(split, (0, 0, 0))
        lines.append(f"{split:<10} {s[0]:>7} {s[1]:>9} {s[2] / 1e6:>10.1f}")
        tot = [a + b for a, b in zip(tot, s)]
    lines.append(f"{'total':<10} {tot[0]:>7} {tot[1]:>9} {tot[2] / 1e6:>10.1f}")
    return "\n".join(lines)


def print_summary(results, plan, manifest, missing, elapsed: float, manifest_url: str,
                  file=None) -> None:
    file = file or sys.stderr
    images = sum(r.planned for r in results)
    built = [r for r in results if not r.reused]
    speed = sum(r.planned for r in built) / elapsed if elapsed > 0 else 0.0
    print(f"\nthis task: {len(built)} shards written, {len(results) - len(built)} verified and "
          f"kept, {images} images in {elapsed:.1f} s ({speed:.1f} images/s written)", file=file)
    if manifest is not None:
        rows = {s: (len(v["shards"]), v["samples"], v["bytes"]) for s, v in manifest["splits"].items()}
        rejects, warnings = manifest["rejects"], manifest["warnings"]
        print(split_table(rows), file=file)
        print(f"rejects: {rejects['total']} ({format_counts(rejects['by_reason'])})", file=file)
        listed = max(1, plan.listed - plan.skipped_view)
        if rejects["total"] > 0.2 * listed:  # loud: this is a broken input, not MIMIC noise
            print(f"WARNING: {100 * rejects['total'] / listed:.0f}% of the images were rejected; "
                  "check the inputs (see rejects.jsonl)", file=file)
        print(f"warnings (kept): {warnings['total']} ({format_counts(warnings['by_reason'])})",
              file=file)
        if plan.skipped_view:
            print(f"skipped by --views: {plan.skipped_view}", file=file)
        print(f"manifest: {manifest_url}", file=file)
    else:
        rows: dict = {}
        for r in results:
            s = rows.get(r.split, (0, 0, 0))
            rows[r.split] = (s[0] + 1, s[1] + r.samples, s[2] + r.bytes)
        print(split_table(rows), file=file)
        print(f"manifest: not yet; {len(missing)}+ planned shards belong to tasks still running "
              f"(the last task to finish writes it, or run with --finalize)", file=file)
