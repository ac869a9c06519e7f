"""End to end: MIMIC-shaped trees with planted faults -> shards, manifest, rejects, verify."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from lapvqa.shard import main
from lapvqa.shard.inputs import CHEXPERT_LABELS
from lapvqa.tokenizer import encode
from mimic_fixtures import (ALL_FAULTS, htj2k_decodable, output_digest, relabelled_dicom,
                            write_mimic_dicom_tree, write_mimic_jpg_tree)

SPS = ["--samples-per-shard", "3", "--no-progress"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_mimic_jpg_tree(tmp_path_factory.mktemp("mimic"), n_studies=8, faults=ALL_FAULTS,
                                png_every=3, reports_zip=True)


def _args(tree, out, *extra, reports=None):
    return ["--images", str(tree.images_root), "--reports", str(reports or tree.reports_dir),
            "--out", str(out), *SPS, *extra]



@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(_args(tree, out, "--workers", "1")) == 0
    return out


@pytest.mark.timeout(120)
def test_samples_rejects_and_manifest(tree, reference):
    m = json.loads((reference / "manifest.json").read_text())
    assert {"format", "format_version", "lapvqa_version", "created_by", "settings", "splits",
            "rejects"} <= set(m)
    assert m["format"] == "lapvqa-shards" and m["format_version"] == 1
    assert m["settings"]["size"] == 384 and m["settings"]["sections"] == "full"
    keys = {}
    for split, v in m["splits"].items():
        assert v["samples"] == sum(s["samples"] for s in v["shards"])
        for s in v["shards"]:
            data = (reference / s["name"]).read_bytes()
            assert s["name"].startswith(split + "-") and len(data) == s["bytes"]
            assert hashlib.sha256(data).hexdigest() == s["sha256"]
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                for mem in tf.getmembers():
                    assert (mem.mtime, mem.uid, mem.gid, mem.uname, mem.mode) == (0, 0, 0, "", 0o644)
                    keys.setdefault(mem.name.split(".")[0], split)
    assert keys == {k: v["split"] for k, v in tree.expected_samples.items()}
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text().splitlines()]
    got = sorted((r["dicom_id"], r["reason"]) for r in rejects)
    want = sorted((k.split("#")[0], v) for k, v in tree.expected_rejects.items())
    assert got == want
    assert m["rejects"]["total"] == len(want)
    assert m["warnings"]["by_reason"]["report_non_utf8"] >= 1
    assert not list(reference.rglob(".tmp.*"))
    assert m["settings"]["images_listed"] == len(want) + len(tree.expected_samples)


@pytest.mark.timeout(120)
def test_stock_webdataset_reads_shards(tree, reference):
    m = json.loads((reference / "manifest.json").read_text())
    urls = [str(reference / s["name"]) for v in m["splits"].values() for s in v["shards"]]
    seen = 0
    for s in wds.WebDataset(urls, shardshuffle=False).decode("l"):
        assert {"jpg", "txt", "tokens.npy", "json"} <= set(s)
        assert s["jpg"].shape == (384, 384) and s["jpg"].ndim == 2  # grayscale
        assert s["tokens.npy"].dtype == np.uint16 and s["tokens.npy"].tolist() == encode(s["txt"])
        meta = s["json"]
        exp = tree.expected_samples[s["__key__"]]
        assert (meta["subject_id"], meta["study_id"], meta["split"], meta["view"]) == (
            exp["subject"], exp["study"], exp["split"], exp["view"])
        assert list(meta["labels"]) == list(CHEXPERT_LABELS)
        assert set(meta["labels"].values()) <= {1, 0, -1, None}
        assert meta["truncated"] is False and len(meta["orig_size"]) == 2
        assert meta["source"] == exp["kind"]
        assert "FINAL REPORT" not in s["txt"]
        seen += 1
    assert seen == len(tree.expected_samples) == m["splits"]["train"]["samples"] + \
        m["splits"]["validate"]["samples"] + m["splits"]["test"]["samples"]


@pytest.mark.timeout(180)
def test_byte_identical_for_workers_tasks_and_zip(tree, reference, tmp_path, monkeypatch, capsys):
    ref = output_digest(reference)
    out2 = tmp_path / "w2"
    assert main(_args(tree, out2, "--workers", "2", reports=tree.reports_zip)) == 0
    assert output_digest(out2) == ref
    # SLURM array of 2 (1-based ids like --array=1-2): task 2 first, then task 1 completes it.
    out3 = tmp_path / "slurm"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert main(_args(tree, out3, "--workers", "1")) == 0
    assert not (out3 / "manifest.json").exists()
    assert "manifest: not yet" in capsys.readouterr().err
    assert main(["--finalize"] + _args(tree, out3)) == 1  # incomplete: says so, no manifest
    assert not (out3 / "manifest.json").exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert main(_args(tree, out3, "--workers", "1")) == 0
    assert output_digest(out3) == ref
    (out3 / "manifest.json").unlink()
    assert main(["--finalize"] + _args(tree, out3)) == 0
    assert output_digest(out3) == ref


@pytest.mark.timeout(120)
def test_verify_passes_then_catches_corruption(tree, reference, tmp_path, capsys):
    assert main(["--verify", str(reference), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "verify" in out and "OK" in out and "tokens train: p50" in out and "rejects: 15" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in reference.iterdir():
        if p.is_file():
            (bad / p.name).write_bytes(p.read_bytes())
    victim = sorted(bad.glob("train-*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["--verify", str(bad), "--workers", "2"]) == 1
    assert f"PROBLEM {victim.name}: size/sha256 differ" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_settings_change_refused_and_options(tree, reference, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_args(tree, out, "--workers", "1", "--views", "frontal",
                      "--sections", "findings-impression", "--max-tokens", "12",
                      "--size", "96")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["skipped_by_views"] > 0
    shard = next(s for v in m["splits"].values() for s in v["shards"] if s["samples"])
    for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False).decode("l"):
        assert s["jpg"].shape == (96, 96) and s["json"]["view"] in ("PA", "AP")
        assert len(s["tokens.npy"]) <= 12 and s["json"]["truncated"]
        assert s["txt"].startswith(("FINDINGS:", "IMPRESSION:"))
    assert m["rejects"]["by_reason"].get("report_no_findings_impression", 0) >= 1
    capsys.readouterr()
    assert main(_args(tree, out, "--workers", "1", "--size", "128")) == 2
    err = capsys.readouterr().err.strip()
    assert "another plan" in err and "size" in err and "\n" not in err
    assert main(_args(tree, out, "--workers", "1", "--overwrite")) == 0
    got, ref = output_digest(out), output_digest(reference)
    assert {k: got.get(k) for k in ref} == ref  # the manifest names only the new shards


def _rc(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv,needle", [
    (["--images", "/nonexistent"], "neither a MIMIC"),
    (["--reports", "/nonexistent"], "no such folder or zip"),
    (["--task-index", "3", "--num-tasks", "2"], "--task-index 3"),
    (["--out", "gs://bucket/x"], "unsupported store URL"),
    (["--samples-per-shard", "0"], "--samples-per-shard"),
])
def test_bad_arguments_exit_2_with_one_line(tree, tmp_path, capsys, argv, needle):
    opts = {"--images": str(tree.images_root), "--reports": str(tree.reports_dir),
            "--out": str(tmp_path / "o"), **dict(zip(argv[::2], argv[1::2]))}
    assert _rc([x for kv in opts.items() for x in kv] + ["--no-progress"]) == 2
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.timeout(60)
def test_destination_io_failure_exit_3(tree, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(_args(tree, blocker / "out", "--workers", "1")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lapvqa.shard: I/O error: cannot write")


@pytest.mark.timeout(120)
def test_dicom_root_with_and_without_jpg_csvs(tmp_path, capsys):
    tree = write_mimic_dicom_tree(tmp_path / "d", n_studies=4)
    out = tmp_path / "out"
    assert main(["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
                 "--metadata", str(tree.metadata_dir), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["input_kind"] == "dicom" and m["rejects"]["total"] == 0
    got = {}
    for v in m["splits"].values():
        for s in v["shards"]:
            for x in wds.WebDataset(str(out / s["name"]), shardshuffle=False).decode("l"):
                got[x["__key__"]] = (x["json"]["split"], x["jpg"])
    assert {k: v[0] for k, v in got.items()} == {k: v["split"] for k, v in tree.expected_samples.items()}
    for k, (_, img) in got.items():  # bone/body bright, background dark, whatever the photometry
        assert img[192, 150:230].mean() > img[5, 150:230].mean() + 0.2, tree.expected_samples[k]
    out2 = tmp_path / "out2"
    capsys.readouterr()
    assert main(["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
                 "--out", str(out2), "--workers", "1", "--no-progress"]) == 0
    assert "patient-level hash split" in capsys.readouterr().err
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["settings"]["split_source"] == "hash(subject_id)"
    assert sum(v["samples"] for v in m2["splits"].values()) == 4
    assert main(["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
                 "--out", str(tmp_path / "o3"), "--views", "frontal", "--no-progress"]) == 2


@pytest.mark.timeout(120)
def test_missing_dicom_codec_stops_the_run_with_one_line(tmp_path, capsys):
    if htj2k_decodable():
        pytest.skip("an HTJ2K decoder is installed here")
    tree = write_mimic_dicom_tree(tmp_path / "d", n_studies=2)
    path = next(tree.images_root.rglob("*.dcm"))
    path.write_bytes(relabelled_dicom(path))  # HTJ2K: python-gdcm (a dependency) cannot decode it
    rc = main(["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
               "--metadata", str(tree.metadata_dir), "--out", str(tmp_path / "o"),
               "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "1.2.840.10008.1.2.4.201" in err and "pip install" in err
    assert "pylibjpeg-openjpeg" in err


@pytest.mark.timeout(120)
def test_all_rejected_shard_is_left_out(tmp_path):
    tree = write_mimic_jpg_tree(tmp_path / "m", n_studies=2, images_per_study=1,
                                faults=("missing_image", "empty_image", "tiny_image"))
    out = tmp_path / "o"
    args = ["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
            "--out", str(out), "--samples-per-shard", "1", "--no-progress", "--workers", "1"]
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    listed = {s["name"] for v in m["splits"].values() for s in v["shards"]}
    assert listed == {p.name for p in out.glob("*.tar")} and len(listed) == 2
    assert all(s["samples"] > 0 for v in m["splits"].values() for s in v["shards"])
    assert m["rejects"]["total"] == 3
    assert main(args) == 0 and main(["--verify", str(out), "--workers", "1"]) == 0


def test_every_flag_has_help_and_defaults_follow_the_card():
    from lapvqa.shard.cli import build_parser

    p = build_parser()
    assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]
    d = p.parse_args([])
    assert (d.size, d.sections, d.max_tokens, d.views) == (384, "full", 510, "all")
