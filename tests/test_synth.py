"""lapvqa.synth: MIMIC-shaped tree, determinism, report/label consistency, visible findings."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import simplejpeg

from lapvqa.synth import BY_KEY, FINDING_KEYS, SynthConfig, label_report, read_truth, synthesize
from lapvqa.synth import phrases as P
from lapvqa.synth.__main__ import main as synth_main
from lapvqa.synth.cohort import FindingState, build_cohort
from lapvqa.synth.render import render

pytestmark = pytest.mark.timeout(120)

DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
METADATA = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
            "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
            "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
            "PatientOrientationCodeSequence_CodeMeaning"]
CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
            "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
            "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
SMALL = dict(studies=40, seed=3, min_size=160, max_size=240, reports="both",
             odd_layout_rate=0.2, impression_only_rate=0.2)


def _csv(root, name) -> tuple[list[str], list[dict]]:
    with gzip.open(os.path.join(root, f"mimic-cxr-2.0.0-{name}.csv.gz"), "rt") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _all_files(root) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synth") / "mimic")
    assert synth_main(["--out", root, "--studies", "40", "--seed", "3", "--min-size", "160",
                       "--max-size", "240", "--reports", "both", "--workers", "2",
                       "--odd-layout-rate", "0.2", "--impression-only-rate", "0.2"]) == 0
    return root


def test_tree_and_csvs_have_mimic_layout(tree):
    cols, meta = _csv(tree, "metadata")
    assert cols == METADATA
    split_cols, split = _csv(tree, "split")
    assert split_cols == ["dicom_id", "study_id", "subject_id", "split"]
    label_cols, labels = _csv(tree, "chexpert")
    assert label_cols == ["subject_id", "study_id"] + CHEXPERT
    assert _csv(tree, "negbio")[1] == labels
    assert len({r["study_id"] for r in meta}) == len(labels) == 40
    assert {r["ViewPosition"] for r in meta} <= {"PA", "AP", "LATERAL", "LL"}
    assert {"PA", "AP", "LATERAL"} <= {r["ViewPosition"] for r in meta}
    for r in meta:
        s = r["subject_id"]
        assert DICOM_ID.match(r["dicom_id"])
        assert re.fullmatch(r"1\d{7}", s) and re.fullmatch(r"5\d{7}", r["study_id"])
        path = os.path.join(tree, "files", f"p{s[:2]}", f"p{s}", f"s{r['study_id']}",
                            r["dicom_id"] + ".jpg")
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(open(path, "rb").read())
        assert (height, width, colorspace) == (int(r["Rows"]), int(r["Columns"]), "Gray")
        assert 160 <= max(height, width) <= 240
        assert re.fullmatch(r"2[12]\d{6}", r["StudyDate"])
        assert re.fullmatch(r"\d{1,6}\.\d{3}", r["StudyTime"])
    for r in labels:
        assert all(r[c] in ("1.0", "0.0", "-1.0", "") for c in CHEXPERT)
    # The split is by patient and every split is populated.
    by_subject: dict[str, set] = {}
    for r in split:
        by_subject.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(v) == 1 for v in by_subject.values())
    assert {r["split"] for r in split} == {"train", "validate", "test"}
    assert sorted(r["dicom_id"] for r in split) == sorted(r["dicom_id"] for r in meta)


def test_reports_tree_and_zip_agree_and_look_like_mimic(tree):
    _, labels = _csv(tree, "chexpert")
    with zipfile.ZipFile(os.path.join(tree, "mimic-cxr-reports.zip")) as zf:
        zipped = {n: zf.read(n).decode() for n in zf.namelist()}
    layouts = set()
    for r in labels:
        s = r["subject_id"]
        rel = f"files/p{s[:2]}/p{s}/s{r['study_id']}.txt"
        text = open(os.path.join(tree, rel), encoding="utf-8").read()
        assert zipped[rel] == text
        assert " " * 33 + "FINAL REPORT\n" in text
        lines = text.splitlines()
        body = [line for line in lines if "FINAL REPORT" not in line]
        assert all(line.startswith(" ") and len(line) <= 80 for line in body)
        layouts.add(("FINDINGS:" in text, "IMPRESSION:" in text))
    assert layouts >= {(True, True), (False, True)}  # some reports have no FINDINGS section
    assert any("___" in t for t in zipped.values())


def test_labels_truth_and_report_text_agree(tree):
    _, labels = _csv(tree, "chexpert")
    truth = read_truth(tree)
    for r in labels:
        s = r["subject_id"]
        text = open(os.path.join(tree, f"files/p{s[:2]}/p{s}/s{r['study_id']}.txt")).read()
        read = label_report(text)
        rec = truth[int(r["study_id"])]
        for key in FINDING_KEYS:
            column = r[BY_KEY[key].chexpert]
            expected = None if column == "" else int(float(column))
            assert read[key] == expected, (key, text)
            assert rec["truth"][key] == int(expected in (1, -1)) or expected is None
        pathology = [k for k in FINDING_KEYS if k != "devices" and read[k] in (1, -1)]
        assert r["No Finding"] == ("" if pathology else "1.0")
        opacity = r["Consolidation"] if read["consolidation"] in (1, -1) else ""
        assert r["Lung Opacity"] == opacity


def test_same_seed_same_bytes_whatever_the_workers(tree, tmp_path):
    again = str(tmp_path / "again")
    synthesize(SynthConfig(out=again, workers=1, **SMALL))
    assert _all_files(again) == _all_files(tree)
    other = str(tmp_path / "other")
    synthesize(SynthConfig(out=other, workers=1, **{**SMALL, "seed": 4, "studies": 5}))
    assert _csv(other, "metadata")[1][0]["dicom_id"] != _csv(tree, "metadata")[1][0]["dicom_id"]


def test_refuses_to_overwrite_without_force_and_force_replaces(tree, tmp_path, capsys):
    assert synth_main(["--out", tree, "--studies", "2"]) == 2
    assert "--force" in capsys.readouterr().err
    out = str(tmp_path / "t")
    os.makedirs(os.path.join(out, "files"))
    open(os.path.join(out, "keep.txt"), "w").write("user data")
    assert synth_main(["--out", out, "--studies", "2", "--force"]) == 2  # not our tree: untouched
    assert os.listdir(os.path.join(out, "files")) == []
    os.rmdir(os.path.join(out, "files"))
    assert synth_main(["--out", out, "--studies", "3", "--min-size", "96", "--max-size", "96"]) == 0
    assert synth_main(["--out", out, "--studies", "1", "--min-size", "96", "--max-size", "96",
                       "--force"]) == 0
    assert len(read_truth(out)) == 1 and open(os.path.join(out, "keep.txt")).read() == "user data"
    assert synth_main(["--out", str(tmp_path / "x"), "--findings", "edema"]) == 2


# ---- the phrase tables and the labeler -----------------------------------------------------------
def _fill(template: str, side: str = "left", size: str = "small") -> str:
    return template.format(size=size, size_adv="mildly", side=side, Side=side.capitalize())


def _only(key: str, label, text: str) -> None:
    got = label_report(text)
    assert got[key] == label, text
    assert all(v is None for k, v in got.items() if k != key), (text, got)


def test_every_template_round_trips_through_the_labeler():
    for key in FINDING_KEYS:
        for t in P.POSITIVE[key] + P.IMPRESSION_POSITIVE[key]:
            if key != "devices":
                _only(key, 1, _fill(t, side="right", size=P.SIZES.get(key, ("small",))[0]))
        for t in P.UNCERTAIN.get(key, ()):
            _only(key, -1, _fill(t))
        for t in P.NEGATIVE[key]:
            _only(key, 0, t)
    for t in P.POSITIVE_BILATERAL_EFFUSION + P.IMPRESSION_BILATERAL_EFFUSION:
        _only("effusion", 1, _fill(t, side="bilateral"))
    for sentences in P.DEVICE_SENTENCES.values():
        for t in sentences:
            _only("devices", 1, t + ".")
    for t in P.CLEAR_LUNGS:
        _only("consolidation", 0, t)
    for t in P.NO_ACUTE + P.OTHER_FINDINGS + P.PNEUMONIA_HEDGE:
        assert all(v is None for v in label_report(t).values()), t
    for t in P.JOINT_NEGATIVE:
        got = label_report(t.format(items="focal consolidation, pleural effusion, or pneumothorax"))
        assert (got["consolidation"], got["effusion"], got["pneumothorax"]) == (0, 0, 0)


@pytest.mark.parametrize("text, expected", [
    ("No change in the small left pleural effusion.", {"effusion": 1}),
    ("Small right effusion but no pneumothorax.", {"effusion": 1, "pneumothorax": 0}),
    ("There is a small left pleural effusion without pneumothorax.",
     {"effusion": 1, "pneumothorax": 0}),
    ("The heart is normal in size. ET tube ends 4 cm above the carina.",
     {"cardiomegaly": 0, "devices": 1}),
    ("findings : no pneumothorax . mild cardiomegaly .", {"pneumothorax": 0, "cardiomegaly": 1}),
    ("INDICATION:  eval for pneumothorax\n \n IMPRESSION: \n \n No pneumothorax.",
     {"pneumothorax": 0}),
    ("Pneumothorax cannot be excluded.", {"pneumothorax": -1}),
    ("", {}),
])
def test_labeler_on_free_text(text, expected):
    got = label_report(text)
    assert {k: v for k, v in got.items() if v is not None} == expected


# ---- the pictures ---------------------------------------------------------------------------
def _toggled(study, key: str, side: str):
    devices = ("ett", "cvc") if key == "devices" else ()
    findings = {**study.findings, key: FindingState(True, 1, side, 1, devices)}
    return replace(study, findings=findings)


def test_each_finding_changes_its_own_region_in_the_expected_direction():
    """Render each study with and without one finding (same seed): the picture changes where and
    how the finding says, and nowhere else."""
    cfg = SynthConfig(out="", studies=8, seed=5, prevalence=0.0, min_size=200, max_size=260)
    # (finding, side) -> (rows, cols) of its region in fractions of the image, expected sign.
    region = {
        ("cardiomegaly", "left"): ((0.45, 0.9), (0.5, 0.95), +1),
        ("effusion", "right"): ((0.45, 0.85), (0.0, 0.5), +1),
        ("effusion", "left"): ((0.45, 0.85), (0.5, 1.0), +1),
        ("pneumothorax", "right"): ((0.05, 0.6), (0.0, 0.35), -1),
        ("pneumothorax", "left"): ((0.05, 0.6), (0.65, 1.0), -1),
        ("devices", "right"): ((0.0, 0.45), (0.3, 0.6), +1),
        ("consolidation", "right"): ((0.4, 0.85), (0.0, 0.5), +1),
        ("consolidation", "left"): ((0.4, 0.85), (0.5, 1.0), +1),
    }
    for study in build_cohort(cfg):
        frontal = [im for im in study.images if im.view in ("PA", "AP")][0]
        base = render(study, frontal).astype(np.float32)
        for (key, side), ((r0, r1), (c0, c1), sign) in region.items():
            diff = render(_toggled(study, key, side), frontal).astype(np.float32) - base
            h, w = diff.shape
            inside = np.zeros_like(diff, bool)
            inside[int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)] = True
            change = sign * diff[inside].mean()
            assert change > 2.0, (key, side, change)  # gray levels, averaged over the region
            assert np.abs(diff[inside]).sum() > 4 * np.abs(diff[~inside]).sum(), (key, side)


def test_lateral_views_show_the_findings_too():
    cfg = SynthConfig(out="", studies=6, seed=9, prevalence=0.0, lateral_rate=1.0, min_size=200,
                      max_size=240)
    for study in build_cohort(cfg):
        lateral = [im for im in study.images if im.view in ("LATERAL", "LL")][0]
        base = render(study, lateral).astype(np.float32)
        for key in ("cardiomegaly", "effusion", "devices", "consolidation"):
            diff = render(_toggled(study, key, "left"), lateral).astype(np.float32) - base
            assert diff.mean() > 0.5, key


def test_synthetic_tree_is_accepted_unchanged_by_the_sharder(tree, tmp_path):
    from lapvqa.shard.cli import main as shard_main

    out = tmp_path / "shards"
    assert shard_main(["--images", tree, "--reports", os.path.join(tree, "mimic-cxr-reports.zip"),
                       "--out", str(out), "--size", "64", "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    _, meta = _csv(tree, "metadata")
    assert sum(s["samples"] for s in manifest["splits"].values()) == len(meta)
    assert manifest["rejects"]["total"] == 0
    assert (out / "rejects.jsonl").read_text().strip() == ""


def test_findings_flag_and_prevalence_are_honoured():
    cfg = SynthConfig(out="", studies=400, seed=1, findings=("effusion", "devices"))
    cohort = build_cohort(cfg)
    rates = {k: np.mean([s.findings[k].present for s in cohort]) for k in FINDING_KEYS}
    assert rates["cardiomegaly"] == rates["pneumothorax"] == rates["consolidation"] == 0
    assert 0.38 < rates["effusion"] < 0.52 and 0.38 < rates["devices"] < 0.52


def test_low_variety_reports_state_the_same_facts_in_fixed_sentences():
    from lapvqa.synth.reports import PLAIN_ORDER, plain_statements, write_report

    cohort = build_cohort(SynthConfig(out="", studies=300, seed=2))
    plain, varied = set(), set()
    for study in cohort:
        text = write_report(study, odd_rate=0.5, impression_only_rate=0.0, variety="low")
        assert label_report(text) == {k: s.statement for k, s in study.findings.items()}
        statements = plain_statements(study.findings)
        mentioned = [k for k in PLAIN_ORDER if study.findings[k].statement is not None]
        # one sentence group per mentioned finding, in the fixed order
        said = [next(k for k, v in label_report(s).items() if v is not None) for s in statements]
        assert said == mentioned
        plain.update(statements)
        varied.update(s for s in text.split("\n") if s)
        full = write_report(study, odd_rate=0.0, impression_only_rate=0.0)
        findings = full.split("FINDINGS:")[1].split("IMPRESSION:")[0]
        varied.update(x.strip() for x in findings.split("."))
    assert len(plain) < len(varied) / 3  # far fewer distinct sentences than the realistic mix
