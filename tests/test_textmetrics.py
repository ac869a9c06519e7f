"""textmetrics against published values and values computed with pycocoevalcap 1.2's scorers
(Bleu(4) with option='closest', Rouge, Cider) on the very same token strings."""

import math

import pytest

from lapvqa import textmetrics as tm

GTS = {
    "a": ["the heart size is normal", "heart size is within normal limits"],
    "b": ["no acute cardiopulmonary process", "no acute cardiopulmonary abnormality"],
    "c": ["small left pleural effusion with adjacent atelectasis"],
    "d": ["there is no pneumothorax or pleural effusion", "no pleural effusion or pneumothorax is seen"],
    "e": ["lungs are clear"],
}
RES = {
    "a": "the heart is normal in size",
    "b": "no acute cardiopulmonary process",
    "c": "left pleural effusion and atelectasis",
    "d": "no pneumothorax",
    "e": "the lungs are clear bilaterally without focal consolidation",
}
# pycocoevalcap 1.2 on GTS/RES
COCO_BLEU = [0.6646437693452062, 0.5538698077849025, 0.42268177165805015, 0.2821474167555969]
COCO_ROUGE = 0.6769476295189929
COCO_CIDER = 3.324107833356461
COCO_CIDER_PER = {"a": 2.442718358711609, "b": 7.332294999159531, "c": 2.734630803910564,
                  "d": 1.3635468271064177, "e": 2.7473481778941804}

# Papineni et al. 2002 (BLEU paper), example 1: candidate 1 and its three references.
PAP_REFS = [
    "it is a guide to action that ensures that the military will forever heed party commands",
    "it is the guiding principle which guarantees the military forces always being under the "
    "command of the party",
    "it is the practical guide for the army always to heed the directions of the party",
]
PAP_CAND = "it is a guide to action which ensures that the military always obeys the commands of the party"


def test_bleu_rouge_cider_match_coco_caption():
    assert tm.bleu(GTS, RES) == pytest.approx(COCO_BLEU, rel=1e-12)
    assert tm.rouge_l(GTS, RES) == pytest.approx(COCO_ROUGE, rel=1e-12)
    assert tm.cider(GTS, RES) == pytest.approx(COCO_CIDER, rel=1e-12)
    assert tm.cider_per_image(GTS, RES) == pytest.approx(COCO_CIDER_PER, rel=1e-12)


def test_bleu_papineni_modified_precisions():
    b = tm.bleu({0: PAP_REFS}, {0: PAP_CAND})
    # the paper: unigram precision 17/18, bigram 10/17; no brevity penalty (18 >= closest ref)
    assert b[0] == pytest.approx(17 / 18, rel=1e-9)
    assert b[1] == pytest.approx(math.sqrt(17 / 18 * 10 / 17), rel=1e-9)
    assert b == pytest.approx([0.9444444443395061, 0.7453559924158948,
                               0.6240726988634099, 0.5045666839470958], rel=1e-12)
    assert tm.rouge_l({0: PAP_REFS}, {0: PAP_CAND}) == pytest.approx(0.6539961013645226, rel=1e-12)


def test_degenerate_hypotheses_match_coco_caption():
    gts = {1: ["no acute process"], 2: ["mild cardiomegaly"], 3: ["the lungs are clear"]}
    res = {1: "", 2: "cardiomegaly", 3: "the lungs are clear"}
    assert tm.bleu(gts, res) == pytest.approx(
        [0.4493289639374902, 0.44932896390753496, 0.4493289638725872, 0.44932896379894727], rel=1e-12)
    assert tm.rouge_l(gts, res) == pytest.approx(0.5429553264604811, rel=1e-12)
    assert tm.cider(gts, res) == pytest.approx(3.914461449920047, rel=1e-12)


def test_perfect_and_disjoint():
    refs = ["the heart is normal", "no effusion is seen", "lungs are clear today"]
    m = tm.compute_metrics(refs, refs)
    assert m["BLEU-1"] == pytest.approx(1.0) and m["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert m["ROUGE-L"] == pytest.approx(1.0)
    m = tm.compute_metrics(refs, ["xx yy zz ww"] * 3)
    assert m["BLEU-1"] < 1e-9 and m["ROUGE-L"] == 0.0 and m["CIDEr"] == 0.0


def test_tokenize_lowercases_and_drops_punctuation():
    assert tm.tokenize("FINDINGS: The heart, lungs (clear).") == "findings the heart lungs clear"
    assert tm.tokenize("No pneumothorax; 3.5 cm x-ray ___ don't.") == \
        "no pneumothorax 3.5 cm x-ray ___ do n't"
    assert tm.compute_metrics(["Heart is normal."], ["heart is NORMAL"])["BLEU-3"] == pytest.approx(1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same ids"):
        tm.bleu({1: ["a"]}, {2: "a"})
    with pytest.raises(ValueError, match="no reference"):
        tm.rouge_l({1: []}, {1: "a"})
    with pytest.raises(ValueError, match="hypotheses"):
        tm.compute_metrics(["a", "b"], ["a"])
