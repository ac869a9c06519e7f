"""BLEU-1..4, ROUGE-L and CIDEr exactly as the coco-caption toolkit (pycocoevalcap) defines them.

Report-generation papers (R2Gen, CvT2DistilGPT2, ...) quote numbers from coco-caption's scorers.
Those scorers are pure Python, but the toolkit's tokenizer shells out to Java (Stanford PTB), and
the package ships >100 MB of jars, so this module re-implements the three scorers line for line:

- BLEU: corpus-level, clipped n-gram counts pooled over all images, brevity penalty against the
  reference length *closest* to each hypothesis (``option='closest'``), the toolkit's
  ``tiny=1e-15`` / ``small=1e-9`` guards; BLEU-n is the geometric mean of precisions 1..n.
- ROUGE-L: per image, LCS precision/recall maximised over references, F-measure with beta=1.2,
  averaged over images.
- CIDEr (the toolkit's "CIDEr", i.e. CIDEr-D): tf-idf n-gram vectors (n=1..4) with document
  frequencies over the evaluated set's references, clipped similarity, Gaussian length penalty
  sigma=6, mean over n, divided by the number of references, times 10. The toolkit's length is
  the number of *bigrams* (an index quirk in ``counts2vec``); it is kept so numbers match.

Given the same token strings, the numbers equal pycocoevalcap's (tests pin values computed with
pycocoevalcap 1.2). :func:`tokenize` approximates the PTB tokenizer (lower-case, split off
punctuation and clitics, drop punctuation tokens); it can differ from Stanford's on rare tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

NGRAM = 4
_TINY, _SMALL = 1e-15, 1e-9  # coco-caption's guards against zero counts / zero length
_ROUGE_BETA = 1.2
_CIDER_SIGMA = 6.0

# Words (keeping internal '-', '.', '/', e.g. "x-ray", "3.5", "1/2"), clitics split off the way
# PTB does ("don't" -> "do n't"), then any other single non-space character.
_TOKEN_RE = re.compile(
    r"[a-z0-9_]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b"
    r"|[a-z0-9_]+(?:[-./][a-z0-9_]+)*|\S"
)
_ALNUM_RE = re.compile(r"[a-z0-9_]")


def tokenize(text: str) -> str:
    """Lower-cased, space-joined tokens with punctuation removed (coco-caption's preprocessing)."""
    tokens = _TOKEN_RE.findall(text.lower())
    return " ".join(t for t in tokens if _ALNUM_RE.search(t) or t == "n't")


def _ngrams(words: Sequence[str], n: int = NGRAM) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check(gts: Mapping, res: Mapping) -> list:
    if set(gts) != set(res):
        raise ValueError("references and hypotheses must have the same ids")
    for key in gts:
        if not gts[key]:
            raise ValueError(f"id {key!r} has no reference")
    return sorted(gts, key=str)


# ---------------------------------------------------------------- BLEU


def bleu(gts: Mapping[object, Sequence[str]], res: Mapping[object, str]) -> list[float]:
    """Corpus BLEU-1..4 (coco-caption ``Bleu(4)``); inputs are pre-tokenised strings."""
    correct, guess = [0] * NGRAM, [0] * NGRAM
    testlen_total = reflen_total = 0
    for key in _check(gts, res):
        words = res[key].split()
        counts = _ngrams(words)
        maxref: dict = {}
        reflens = []
        for ref in gts[key]:
            rwords = ref.split()
            reflens.append(len(rwords))
            for gram, c in _ngrams(rwords).items():
                maxref[gram] = max(maxref.get(gram, 0), c)
        testlen = len(words)
        # closest reference length; ties go to the shorter one (tuple ordering in the toolkit)
        reflen_total += min((abs(r - testlen), r) for r in reflens)[1]
        testlen_total += testlen
        for k in range(NGRAM):
            guess[k] += max(0, testlen - k)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(maxref.get(gram, 0), c)
    scores, prod = [], 1.0
    for k in range(NGRAM):
        prod *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen_total + _TINY) / (reflen_total + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# ---------------------------------------------------------------- ROUGE-L


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _rouge_one(hyp: str, refs: Sequence[str]) -> float:
    cand = hyp.split(" ")  # the toolkit splits on single spaces: "" is one empty token
    prec, rec = [], []
    for ref in refs:
        toks = ref.split(" ")
        lcs = _lcs(toks, cand)
        prec.append(lcs / len(cand))
        rec.append(lcs / len(toks))
    p, r = max(prec), max(rec)
    if p == 0 or r == 0:
        return 0.0
    return (1 + _ROUGE_BETA**2) * p * r / (r + _ROUGE_BETA**2 * p)


def rouge_l(gts: Mapping[object, Sequence[str]], res: Mapping[object, str]) -> float:
    """Mean per-image ROUGE-L F (beta 1.2), coco-caption ``Rouge``."""
    keys = _check(gts, res)
    return sum(_rouge_one(res[k], gts[k]) for k in keys) / len(keys)


# ---------------------------------------------------------------- CIDEr(-D)


def _tfidf(counts: Counter, df: Mapping, log_n_images: float) -> tuple[list[dict], list[float], int]:
    vec: list[dict] = [{} for _ in range(NGRAM)]
    norm = [0.0] * NGRAM
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        vec[n][gram] = tf * (log_n_images - math.log(max(1.0, df.get(gram, 0.0))))
        norm[n] += vec[n][gram] ** 2
        if n == 1:  # the toolkit's quirk: "length" counts bigrams (see module docstring)
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _cider_sim(hyp: tuple, ref: tuple) -> list[float]:
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    penalty = math.exp(-((lh - lr) ** 2) / (2 * _CIDER_SIGMA**2))
    out = []
    for n in range(NGRAM):
        val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
        if nh[n] != 0 and nr[n] != 0:
            val /= nh[n] * nr[n]
        out.append(val * penalty)
    return out


def cider_per_image(gts: Mapping[object, Sequence[str]], res: Mapping[object, str]) -> dict:
    """Per-image CIDEr-D (coco-caption ``Cider``); idf comes from this set's references."""
    keys = _check(gts, res)
    refs = {k: [_ngrams(r.split()) for r in gts[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        df.update({g for c in refs[k] for g in c})
    log_n = math.log(float(len(keys)))
    scores = {}
    for k in keys:
        hyp = _tfidf(_ngrams(res[k].split()), df, log_n)
        total = [0.0] * NGRAM
        for rc in refs[k]:
            sim = _cider_sim(hyp, _tfidf(rc, df, log_n))
            total = [a + b for a, b in zip(total, sim)]
        scores[k] = sum(total) / NGRAM / len(refs[k]) * 10.0
    return scores


def cider(gts: Mapping[object, Sequence[str]], res: Mapping[object, str]) -> float:
    per = cider_per_image(gts, res)
    return sum(per.values()) / len(per)


# ---------------------------------------------------------------- convenience


def compute_metrics(
    references: Sequence[str | Sequence[str]],
    hypotheses: Sequence[str],
    *,
    tokenized: bool = False,
) -> dict[str, float]:
    """All metrics for parallel lists; a reference may be one string or a list of strings.

    Raw text is run through :func:`tokenize` unless ``tokenized`` is True.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    prep = (lambda s: s) if tokenized else tokenize
    gts = {i: [prep(r)] if isinstance(r, str) else [prep(x) for x in r]
           for i, r in enumerate(references)}
    res = {i: prep(h) for i, h in enumerate(hypotheses)}
    b = bleu(gts, res)
    out = {f"BLEU-{n + 1}": b[n] for n in range(NGRAM)}
    out["ROUGE-L"] = rouge_l(gts, res)
    out["CIDEr"] = cider(gts, res)
    return out


def format_metrics(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
