"""The findings the synthetic set renders, and the phrases its reports use for them.

One table serves both directions: the report writer picks sentences from it, and the rule-based
labeler (``labeler.py``) reads any text (a synthetic report or a model's generated one) back into
per-finding statements with the same vocabulary. ``tests/test_synth.py`` checks every template
round-trips through the labeler, so the two can never drift apart.

Templates use ``{size}``, ``{side}`` (patient side: "right", "left", "bilateral"), ``{Side}``
(capitalised), ``{device}`` slots; the first letter of every sentence is capitalised on output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    key: str  # short name used in flags and the truth file
    chexpert: str  # the CheXpert label column it drives
    title: str  # for tables
    mention: str  # regex: the clause talks about this finding
    # regex: the clause says it is absent without a negation word ("heart size is normal")
    normal: str = ""
    # regex: a mention only counts as positive with this too ("heart" alone is not)
    needs_positive: str = ""


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "cardiomegaly", "Cardiomegaly", "Cardiomegaly",
        mention=r"cardiomegaly|\bheart\b|cardiac silhouette",
        normal=r"\bnormal\b|unremarkable|not enlarged|within normal limits|top[- ]normal",
        needs_positive=r"cardiomegaly|enlarge|\blarge\b|increased",
    ),
    Finding(
        "effusion", "Pleural Effusion", "Pleural effusion",
        mention=r"effusion|costophrenic",
        normal=r"\bsharp\b|preserved",
    ),
    Finding(
        "pneumothorax", "Pneumothorax", "Pneumothorax",
        mention=r"pneumothora(?:x|ces)",
    ),
    Finding(
        "devices", "Support Devices", "Support devices",
        mention=(r"endotracheal tube|\bET tube|nasogastric tube|\bNG tube|enteric tube|"
                 r"central venous catheter|central line|\bPICC\b|pacemaker|pacer|"
                 r"support devices|monitoring devices|lines or tubes|tubes or lines|"
                 r"indwelling devices|lines and tubes|\bdevices\b"),
    ),
    Finding(
        "consolidation", "Consolidation", "Consolidation",
        mention=(r"consolidation|airspace opacit|airspace disease|lungs are clear|"
                 r"lungs are well expanded and clear"),
        normal=r"lungs are (?:well expanded and )?clear",
    ),
)
FINDING_KEYS: tuple[str, ...] = tuple(f.key for f in FINDINGS)
BY_KEY: dict[str, Finding] = {f.key: f for f in FINDINGS}

# Words that negate what follows them inside the same clause (NegBio/CheXpert style).
NEGATION = (r"\bno\b|\bnot\b|\bwithout\b|negative for|free of|\bresolved\b|\bnor\b|"
            r"\babsence of\b|\bnone\b")
# "no change in the effusion" does not negate the effusion.
PSEUDO_NEGATION = r"\bno (?:significant |interval )?change\b|\bnot (?:significantly )?changed\b"
UNCERTAINTY = (r"\bpossible\b|\bpossibly\b|\bmay\b|\bcould\b|cannot be (?:excluded|ruled out)|"
               r"\bsuspect|\bquestion(?:able)?\b|\bequivocal\b|\bsuggest")
# Clauses end at sentence ends and at words that start a new statement.
CLAUSE_SPLIT = r"[.;:\n]+|\bbut\b|\bhowever\b|\balthough\b|\bwhich\b|\bwith\b"

SIZES = {
    "effusion": ("small", "moderate", "large"),
    "pneumothorax": ("small", "moderate", "large"),
    "cardiomegaly": ("mild", "moderate", "severe"),
}

# ---- positive statements ----------------------------------------------------------------------
POSITIVE: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        "The heart is {size_adv} enlarged.",
        "{size} cardiomegaly.",
        "There is {size} cardiomegaly.",
        "The cardiac silhouette is enlarged.",
        "{size} enlargement of the cardiac silhouette is present.",
        "Heart size is {size_adv} enlarged.",
    ),
    "effusion": (
        "There is a {size} {side} pleural effusion.",
        "{size} {side} pleural effusion.",
        "A {size} {side} pleural effusion is present.",
        "{size} {side} pleural effusion blunts the costophrenic angle.",
        "Blunting of the {side} costophrenic angle reflects a {size} pleural effusion.",
        "There is a {side} pleural effusion, {size} in size.",
    ),
    "pneumothorax": (
        "There is a {size} {side} apical pneumothorax.",
        "{size} {side} pneumothorax.",
        "A {side} pneumothorax is present, {size} in size.",
        "A {size} {side} apical pneumothorax is seen, the visceral pleural line is visible.",
        "{Side} apical pneumothorax is {size}.",
    ),
    "devices": (
        "{device}.",
    ),
    "consolidation": (
        "There is a focal consolidation in the {side} lower lung.",
        "{Side} lower lobe consolidation.",
        "Focal consolidation at the {side} lung base.",
        "Patchy airspace opacity in the {side} lower lung, consistent with consolidation.",
        "{Side} basilar consolidation is present.",
    ),
}
# Bilateral effusions read differently ("effusions", no article).
POSITIVE_BILATERAL_EFFUSION = (
    "{size} bilateral pleural effusions.",
    "There are {size} bilateral pleural effusions.",
    "Bilateral pleural effusions are {size}.",
    "{size} bilateral pleural effusions blunt the costophrenic angles.",
)
# Short forms for the IMPRESSION when the FINDINGS section already described it.
IMPRESSION_POSITIVE: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("{size} cardiomegaly.", "Enlarged cardiac silhouette."),
    "effusion": ("{size} {side} pleural effusion.", "{Side} pleural effusion."),
    "pneumothorax": ("{size} {side} pneumothorax.", "{Side} apical pneumothorax."),
    "devices": ("Support devices as described.", "Lines and tubes in standard position."),
    "consolidation": ("{Side} lower lobe consolidation.", "{Side} basilar consolidation."),
}
IMPRESSION_BILATERAL_EFFUSION = ("{size} bilateral pleural effusions.",
                                 "Bilateral pleural effusions.")
# Each device sentence (a support-device finding lists one to three of them).
DEVICE_SENTENCES: dict[str, tuple[str, ...]] = {
    "ett": ("Endotracheal tube terminates ___ cm above the carina",
            "The endotracheal tube is in standard position",
            "An endotracheal tube is in place with tip above the carina"),
    "ng": ("A nasogastric tube courses below the diaphragm with tip in the stomach",
           "Enteric tube tip is in the stomach",
           "The NG tube extends below the diaphragm"),
    "cvc": ("Right internal jugular central venous catheter terminates in the mid SVC",
            "A right-sided central line ends in the SVC",
            "Right IJ central venous catheter tip is at the cavoatrial junction"),
    "picc": ("Left PICC terminates in the lower SVC",
             "A left-sided PICC ends in the SVC"),
    "pacer": ("Left-sided pacemaker with leads in the right atrium and right ventricle",
              "A left chest wall pacemaker is present with leads in standard position",
              "Dual-lead pacer device is unchanged in position"),
}
DEVICE_KINDS: tuple[str, ...] = tuple(DEVICE_SENTENCES)
# Sentences about the lung not explained by a device, usable with consolidation positive:
PNEUMONIA_HEDGE = (" This could represent pneumonia.", " Findings may reflect pneumonia.")

# ---- uncertain statements (CheXpert -1) -------------------------------------------------------
UNCERTAIN: dict[str, tuple[str, ...]] = {
    "effusion": ("Possible small {side} pleural effusion.",
                 "A small {side} pleural effusion cannot be excluded."),
    "pneumothorax": ("Possible small {side} apical pneumothorax.",
                     "A tiny {side} apical pneumothorax cannot be excluded."),
    "consolidation": ("Opacity at the {side} base could represent consolidation.",
                      "Possible {side} basilar consolidation."),
}

# ---- negative statements ----------------------------------------------------------------------
NEGATIVE: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        "The heart size is normal.",
        "Heart size is within normal limits.",
        "The cardiac silhouette is not enlarged.",
        "No cardiomegaly.",
        "Normal heart size.",
        "The cardiac silhouette is unremarkable.",
    ),
    "effusion": (
        "No pleural effusion.",
        "There is no pleural effusion.",
        "No pleural effusion is seen.",
        "The costophrenic angles are sharp.",
        "There is no evidence of pleural effusion.",
    ),
    "pneumothorax": (
        "No pneumothorax.",
        "There is no pneumothorax.",
        "No pneumothorax is seen.",
        "There is no evidence of pneumothorax.",
        "No pneumothorax is identified.",
    ),
    "devices": (
        "No support devices are seen.",
        "There are no lines or tubes.",
        "No indwelling devices.",
    ),
    "consolidation": (
        "No focal consolidation.",
        "There is no focal consolidation.",
        "No consolidation is seen.",
        "There is no focal airspace consolidation.",
    ),
}
# Clear-lung sentences: only used when no lung finding at all is present.
CLEAR_LUNGS = ("The lungs are clear.", "The lungs are well expanded and clear.")
# Joint negations, as radiologists write them: "{a}, {b}, or {c}".
JOINT_NEGATIVE = ("No {items}.", "There is no {items}.", "No evidence of {items}.")
JOINT_NOUN = {"consolidation": "focal consolidation", "effusion": "pleural effusion",
              "pneumothorax": "pneumothorax"}
NO_ACUTE = ("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.",
            "No acute cardiopulmonary abnormality.")

# ---- everything else in a report ------------------------------------------------------------
INDICATIONS = (
    "___ year old man with shortness of breath  // eval for pneumonia",
    "___ year old woman with cough and fever  // pneumonia?",
    "___M with chest pain  // r/o acute process",
    "___F with hypoxia  // eval for effusion",
    "History: ___M with dyspnea",
    "___ year old woman s/p fall  // eval for pneumothorax",
    "___ with CHF exacerbation  // evaluate for edema, effusion",
    "___M s/p CABG  // interval change?",
)
INDICATIONS_DEVICES = (
    "___ year old man intubated  // ETT placement",
    "___F s/p line placement  // assess line position",
    "___M with new pacemaker  // eval lead position",
)
EXAMINATION = {"PA": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}
TECHNIQUE = {
    "PA": ("Chest PA and lateral", "PA and lateral views of the chest",
           "Frontal and lateral radiographs of the chest"),
    "AP": ("Portable AP chest radiograph", "AP portable upright view of the chest",
           "Single frontal view of the chest"),
}
COMPARISON = ("None.", "___", "Chest radiograph from ___.", "Prior study from ___.",
              "Comparison is made to prior study from ___.")
OTHER_FINDINGS = (
    "The mediastinal contours are normal.",
    "Hilar contours are unremarkable.",
    "The visualized osseous structures are intact.",
    "No acute osseous abnormalities.",
    "The imaged upper abdomen is unremarkable.",
    "Degenerative changes are noted in the thoracic spine.",
)


def compile_ci(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)
