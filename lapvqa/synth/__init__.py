"""Synthetic MIMIC-CXR-JPG-shaped chest X-ray sets whose findings are visible and reported.

``python -m lapvqa.synth --out DIR --studies N --seed S`` writes a tree that ``python -m
lapvqa.shard --images DIR --reports DIR`` accepts unchanged; see ``writer.py`` for the layout,
``render.py`` for what each finding looks like, ``phrases.py``/``labeler.py`` for the text.
"""

from lapvqa.synth.cohort import SynthConfig
from lapvqa.synth.labeler import label_report, present, statement_text
from lapvqa.synth.phrases import BY_KEY, FINDING_KEYS, FINDINGS, Finding
from lapvqa.synth.writer import CHEXPERT_COLUMNS, TRUTH_FILE, SynthSummary, read_truth, synthesize

__all__ = ["SynthConfig", "SynthSummary", "synthesize", "read_truth", "label_report", "present",
           "statement_text", "FINDINGS", "FINDING_KEYS", "BY_KEY", "Finding", "CHEXPERT_COLUMNS",
           "TRUTH_FILE"]
