"""lapvqa.demo: the whole pipeline in miniature, the agreement scoring, and --out safety."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from lapvqa import demo
from lapvqa.synth.evaluate import format_table, majority_classes, score
from lapvqa.synth.phrases import FINDING_KEYS


def _truth(rows: list[tuple[int, str, dict]]) -> dict[int, dict]:
    return {sid: {"study_id": sid, "split": split, "truth": {k: t.get(k, 0) for k in FINDING_KEYS}}
            for sid, split, t in rows}


def test_agreement_scores_against_image_truth_and_train_majority():
    truth = _truth([(1, "train", {"effusion": 1}), (2, "train", {"effusion": 1}), (3, "train", {}),
                    (10, "test", {"effusion": 1, "devices": 1}), (11, "test", {}),
                    (12, "test", {})])
    majority = majority_classes(truth)
    assert majority["effusion"] and not majority["devices"]
    rows = [
        {"study_id": 10, "generated": "Small left pleural effusion. No pneumothorax.",
         "reference": "x"},
        {"study_id": 11, "generated": "No pleural effusion. ET tube in place.", "reference": "x"},
        {"study_id": 12, "generated": "", "reference": None},
        {"study_id": 99, "generated": "not a synthetic study"},
    ]
    by_key = {s.key: s for s in score(rows, truth, majority)}
    eff, dev = by_key["effusion"], by_key["devices"]
    assert eff.n == 3 and eff.agreement == 1.0 and eff.baseline == pytest.approx(1 / 3)
    assert eff.sensitivity == 1.0 and eff.specificity == 1.0
    assert dev.agreement == pytest.approx(1 / 3)  # missed the tube in 10, invented one in 11
    assert dev.sensitivity == 0.0 and dev.specificity == 0.5
    assert dev.baseline == pytest.approx(2 / 3)
    table = format_table(list(by_key.values()))
    assert "Pleural effusion" in table and "NOT met" in table
    with pytest.raises(ValueError):
        score([{"study_id": 5, "generated": ""}], truth, majority)


def test_out_folder_safety(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(demo.StageError, match="not made by the demo"):
        demo.prepare_out(demo.DemoConfig(out=str(foreign), fresh=True))
    assert (foreign / "thesis.tex").read_text() == "precious"
    mine = tmp_path / "demo"
    p = demo.prepare_out(demo.DemoConfig(out=str(mine)))
    (p.root / "run").mkdir()
    (p.root / "notes.txt").write_text("user file next to the demo's outputs")
    demo.prepare_out(demo.DemoConfig(out=str(mine), fresh=True))
    assert not (p.root / "run").exists() and (p.root / "notes.txt").exists()
    missing = str(tmp_path / "missing.yaml")
    assert demo.main(["--out", str(tmp_path / "x"), "--config", missing]) == 2


@pytest.mark.timeout(240)
def test_demo_pipeline_end_to_end_in_miniature(tmp_path, capsys):
    """Every stage for real (synth, shard, train, consolidate, generate, score, plots) on a dozen
    studies and two optimizer steps, through one plain training process to fit the test budget."""
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--studies", "12", "--steps", "2", "--launcher", "python",
            "--ranks", "1", "--max-new-tokens", "12"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("synth", "shard", "train", "consolidate", "generate", "plot"):
        assert f"] {stage}" in printed
    assert "Where everything went" in printed and "target met for" in printed
    for name in ("model_best.pt", "encoder_final.pt", "config.json"):
        assert (out / "release" / name).is_file()
    # the demo's pixel_norm: pixel maps travel in the weights, and the card says so
    assert "per-pixel mean/std maps of the training images" in (out / "release" / "MODEL_CARD.md").read_text()
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    rows = [json.loads(line) for line in (out / "generated_test.jsonl").read_text().splitlines()]
    assert len(rows) == manifest["splits"]["test"]["samples"] > 0
    scores = json.loads((out / "agreement.json").read_text())
    assert [s["key"] for s in scores] == list(FINDING_KEYS)
    assert all(s["n"] == len(rows) for s in scores)
    assert all(s["reference_agreement"] == 1.0 for s in scores)  # the labeler reads the truth back
    for png in ("loss_curves.png", "test_reports.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) > 200


@pytest.mark.timeout(120)
def test_rerun_keeps_an_unchanged_synthetic_set_and_rebuilds_a_changed_one(tmp_path, capsys):
    cfg = demo.DemoConfig(out=str(tmp_path / "demo"), studies=10, image_size=(96, 128))
    p = demo.prepare_out(cfg)
    demo.stage_synth(cfg, p)
    truth = p.data / "synth-truth.jsonl"
    first = truth.stat().st_mtime_ns
    (p.root / "run").mkdir()  # stands for a finished training run on that set
    demo.stage_synth(cfg, p)
    assert "up to date" in capsys.readouterr().out and truth.stat().st_mtime_ns == first
    assert (p.root / "run").exists()
    changed = demo.DemoConfig(out=cfg.out, studies=11, image_size=(96, 128))
    demo.stage_synth(changed, demo.prepare_out(changed))
    assert len(truth.read_text().splitlines()) == 11
    assert not (p.root / "run").exists()  # trained on the old set: removed, retrained next time
