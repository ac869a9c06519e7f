"""How often generated reports state the findings an image really shows.

Each generated report is read by the rule-based labeler (the same phrase tables the synthesiser
writes from); a finding counts as stated when the text has a positive or hedged statement of it.
The truth is what the image shows (``synth-truth.jsonl``). The baseline predicts, for every test
image, the finding's majority class in the training split.
"""

from __future__ import annotations

from dataclasses import dataclass

from lapvqa.synth.labeler import present
from lapvqa.synth.phrases import BY_KEY, FINDING_KEYS


@dataclass(frozen=True)
class FindingScore:
    key: str
    n: int
    prevalence: float  # in the evaluated rows
    agreement: float  # generated statement == truth
    baseline: float  # training-split majority class == truth
    sensitivity: float | None  # among positives; None when there are none
    specificity: float | None
    reference_agreement: float | None  # the true report, read by the same labeler (sanity: ~1.0)


def majority_classes(truth: dict[int, dict], split: str = "train") -> dict[str, bool]:
    """Per finding, the more common class among ``split``'s studies (ties: absent)."""
    records = [r for r in truth.values() if r["split"] == split] or list(truth.values())
    return {k: 2 * sum(r["truth"][k] for r in records) > len(records) for k in FINDING_KEYS}


def score(rows: list[dict], truth: dict[int, dict],
          majority: dict[str, bool]) -> list[FindingScore]:
    """``rows``: generate's JSONL rows (``study_id``, ``generated``, optional ``reference``)."""
    rows = [r for r in rows if r.get("study_id") in truth]
    if not rows:
        raise ValueError("no generated report matches a study of the synthetic set")
    read = [present(r["generated"]) for r in rows]
    refs = [present(r["reference"]) if r.get("reference") else None for r in rows]
    out = []
    for key in FINDING_KEYS:
        gold = [bool(truth[r["study_id"]]["truth"][key]) for r in rows]
        pred = [p[key] for p in read]
        positives = [p for p, g in zip(pred, gold) if g]
        negatives = [not p for p, g in zip(pred, gold) if not g]
        ref_pairs = [(ref[key], g) for ref, g in zip(refs, gold) if ref is not None]
        out.append(FindingScore(
            key=key, n=len(rows), prevalence=_mean(gold),
            agreement=_mean([p == g for p, g in zip(pred, gold)]),
            baseline=_mean([majority[key] == g for g in gold]),
            sensitivity=_mean(positives) if positives else None,
            specificity=_mean(negatives) if negatives else None,
            reference_agreement=_mean([a == b for a, b in ref_pairs]) if ref_pairs else None,
        ))
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _pct(x: float | None) -> str:
    return "   -" if x is None else f"{100 * x:4.0f}"


def format_table(scores: list[FindingScore], target: float = 0.9, baseline_max: float = 0.6) -> str:
    """A fixed-width table; the last column says whether the demo's target is met."""
    head = (f"{'finding':<18}{'n':>5}{'prev%':>7}{'agree%':>8}{'base%':>7}{'sens%':>7}"
            f"{'spec%':>7}{'ref%':>6}  target (>= {target:.0%}, baseline <= {baseline_max:.0%})")
    lines = [head, "-" * len(head)]
    for s in scores:
        met = s.agreement >= target and s.baseline <= baseline_max
        lines.append(f"{BY_KEY[s.key].title:<18}{s.n:>5}{_pct(s.prevalence):>7}"
                     f"{_pct(s.agreement):>8}{_pct(s.baseline):>7}"
                     f"{_pct(s.sensitivity):>7}{_pct(s.specificity):>7}"
                     f"{_pct(s.reference_agreement):>6}  {'met' if met else 'NOT met'}")
    return "\n".join(lines)
