"""generate: shards (local and S3, through the manifest) and loose image files -> JSONL + metrics."""

from __future__ import annotations

import io
import json

import boto3
import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from lapvqa import generate, textmetrics
from lapvqa.shard.images import encode_gray_jpeg
from lapvqa.shard.writer import tar_bytes
from lapvqa.tokenizer import decode, encode
from mimic_fixtures import (compress_dicom, htj2k_decodable, radiograph, relabelled_dicom,
                            write_dicom)
from release_helpers import make_release
from s3_fixtures import moto_endpoint, moto_s3  # noqa: F401  (pytest fixtures)

REPORTS = ["The heart size is normal. No pleural effusion.",
           "Small left pleural effusion with adjacent atelectasis.",
           "No acute cardiopulmonary process.",
           "Lungs are clear. No pneumothorax.",
           "Mild cardiomegaly without edema.",
           "Right lower lobe opacity, possibly pneumonia."]
MAX_NEW = 6


def _sample(i: int, rng) -> tuple[str, dict]:
    dicom_id = f"{i:08x}-bde0afdd-112c0b34-7bc16630-4e384014"
    img = rng.integers(0, 255, (384, 384), dtype=np.uint8)  # shards hold 384 px; tiny wants 128
    toks = io.BytesIO()
    np.save(toks, np.asarray(encode(REPORTS[i]), np.uint16))
    meta = {"subject_id": 10000032 + i, "study_id": 50414267 + i, "dicom_id": dicom_id, "view": "PA",
            "split": "test", "labels": {}, "orig_size": [3000, 2500], "truncated": False}
    members = {"jpg": encode_gray_jpeg(img, 95), "txt": REPORTS[i].encode(),
               "tokens.npy": toks.getvalue(), "json": json.dumps(meta).encode()}
    return f"p10/p{10000032 + i}/s{50414267 + i}/{dicom_id}", members


def _shard_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    samples = [_sample(i, rng) for i in range(len(REPORTS))]
    files = {"test-000000.tar": tar_bytes(samples[:4]), "test-000001.tar": tar_bytes(samples[4:])}
    manifest = {"format": "lapvqa-shards", "format_version": 1, "settings": {"max_tokens": 64},
                "splits": {"test": {"shards": [
                    {"name": "test-000000.tar", "samples": 4, "bytes": 0, "sha256": ""},
                    {"name": "test-000001.tar", "samples": 2, "bytes": 0, "sha256": ""}],
                    "samples": 6}}, "rejects": {"total": 0, "by_reason": {}}}
    files["manifest.json"] = json.dumps(manifest).encode()
    return files, samples


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    model = make_release(str(out), "tiny")
    return str(out), model


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    files, samples = _shard_files()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files, samples


def _expected(model, jpg: bytes) -> str:
    img = simplejpeg.decode_jpeg(jpg, colorspace="GRAY")[:, :, 0]
    img = np.array(Image.fromarray(img).resize((128, 128), Image.Resampling.LANCZOS))
    ids = model.generate(torch.from_numpy(img)[None, None], max_new_tokens=MAX_NEW)[0].tolist()
    return decode(generate.trim(ids, 50256))


@pytest.mark.timeout(120)
def test_generate_from_local_shards(tmp_path, release, shards, capsys):
    rel, model = release
    root, _, samples = shards
    out = tmp_path / "reports.jsonl"
    rc = generate.main(["--release", rel, "--shards", str(root), "--split", "test", "--out", str(out),
                        "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--device", "cpu",
                        "--metrics", str(tmp_path / "m.json")])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["dicom_id"] for r in rows] == [json.loads(m["json"])["dicom_id"] for _, m in samples]
    assert [r["reference"] for r in rows] == REPORTS
    assert rows[0]["study_id"] == 50414267 and rows[0]["key"] == samples[0][0]
    # batched output == the model's own generate() on each image alone
    for row, (_, members) in zip(rows, samples):
        assert row["generated"] == _expected(model, members["jpg"])
    metrics = textmetrics.compute_metrics(REPORTS, [r["generated"] for r in rows])
    printed = capsys.readouterr().out
    assert "6 reports" in printed and textmetrics.format_metrics(metrics) in printed
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == pytest.approx(metrics)
    assert not (tmp_path / "reports.jsonl.partial").exists()


@pytest.mark.timeout(120)
def test_generate_from_s3_with_beams(tmp_path, release, shards, moto_s3):
    rel, _ = release
    _, files, _ = shards
    bucket = moto_s3[len("s3://"):]
    s3 = boto3.client("s3")
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"mimic/{name}", Body=data)
    out = tmp_path / "r.jsonl"
    rc = generate.main(["--release", rel, "--shards", f"{moto_s3}/mimic", "--out", str(out),
                        "--num-beams", "2", "--limit", "5", "--max-new-tokens", "4",
                        "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and [r["reference"] for r in rows] == REPORTS[:5]
    assert all(len(encode(r["generated"])) <= 4 for r in rows)


def test_generate_from_image_files(tmp_path, release, capsys):
    rel, model = release
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (300, 260), np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "r.jsonl"
    rc = generate.main(["--release", rel, "--out", str(out), "--max-new-tokens", "3",
                        "--device", "cpu", *paths, str(tmp_path / "bad.jpg")])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["dicom_id"] for r in rows] == ["img0", "img1"]
    assert all(r["reference"] is None for r in rows)
    printed = capsys.readouterr().out
    assert "1 inputs rejected" in printed and "BLEU" not in printed


def test_generate_from_dicom_files_and_a_missing_decoder(tmp_path, release, capsys):
    rel, _ = release
    write_dicom(tmp_path / "plain.dcm", radiograph(300, 260).astype(np.float32) * 16, window=(2048, 4096))
    compress_dicom(tmp_path / "plain.dcm", tmp_path / "jll.dcm", "jpeg_lossless")
    out = tmp_path / "r.jsonl"
    rc = generate.main(["--release", rel, "--out", str(out), "--max-new-tokens", "3", "--device",
                        "cpu", str(tmp_path / "plain.dcm"), str(tmp_path / "jll.dcm")])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0 and [r["dicom_id"] for r in rows] == ["plain", "jll"]
    assert rows[0]["generated"] == rows[1]["generated"]  # lossless: the same pixels, same report
    if htj2k_decodable():
        return
    (tmp_path / "htj2k.dcm").write_bytes(relabelled_dicom(tmp_path / "plain.dcm"))
    capsys.readouterr()
    rc = generate.main(["--release", rel, "--out", str(out), "--device", "cpu", str(tmp_path / "htj2k.dcm")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: DICOM transfer syntax 1.2.840.10008.1.2.4.201")


def test_generate_refuses_bad_input(tmp_path, release, capsys):
    rel, _ = release
    assert generate.main(["--release", rel, "--shards", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no manifest.json") and len(err.strip().splitlines()) == 1
    assert generate.main(["--release", str(tmp_path), "--out", str(tmp_path / "o"), "x.png"]) == 2
    assert "config.json missing" in capsys.readouterr().err
    assert generate.main(["--release", rel, "--out", str(tmp_path / "o")]) == 2
    assert "either --shards" in capsys.readouterr().err
