"""Sharding straight to S3 (moto_server on 127.0.0.1): same bytes as local, resumable, verifiable."""

from __future__ import annotations

import hashlib
import json

import pytest
import webdataset as wds

from lapvqa.shard import main
from lapvqa.storage import open_store
from mimic_fixtures import write_mimic_jpg_tree
from s3_fixtures import moto_endpoint, moto_s3  # noqa: F401  (pytest fixtures)


@pytest.mark.timeout(180)
def test_s3_output_matches_local_and_resumes(moto_s3, tmp_path, capsys):
    tree = write_mimic_jpg_tree(tmp_path / "mimic", n_studies=8, faults=("missing_image",),
                                reports_zip=True)
    args = ["--images", str(tree.images_root), "--reports", str(tree.reports_zip),
            "--samples-per-shard", "3", "--no-progress"]
    local = tmp_path / "local"
    assert main(args + ["--out", str(local), "--workers", "1"]) == 0
    url = moto_s3 + "/mimic/shards-v1"
    assert main(args + ["--out", url, "--workers", "2"]) == 0
    store = open_store(url)
    manifest = json.loads(store.read_bytes("manifest.json"))
    names = [s["name"] for v in manifest["splits"].values() for s in v["shards"]]
    assert names and "rejects.jsonl" in store.list()
    for name in names:
        assert store.read_bytes(name) == (local / name).read_bytes()
    # Stock WebDataset reads the shard as fetched from the bucket.
    (tmp_path / "fetched.tar").write_bytes(store.read_bytes(names[0]))
    got = list(wds.WebDataset(str(tmp_path / "fetched.tar"), shardshuffle=False).decode("l"))
    assert got and all(s["jpg"].shape == (384, 384) for s in got)
    assert main(["--verify", url, "--workers", "1"]) == 0
    # A damaged object is redone on re-run; the rest is checked by sha256 and kept.
    store.write_bytes_atomic(names[0], b"garbage")
    capsys.readouterr()
    assert main(args + ["--out", url, "--workers", "1"]) == 0
    assert f"1 shards written, {len(names) - 1} verified and kept" in capsys.readouterr().err
    assert hashlib.sha256(store.read_bytes(names[0])).hexdigest() == \
        hashlib.sha256((local / names[0]).read_bytes()).hexdigest()


@pytest.mark.timeout(120)
def test_s3_unreachable_bucket_is_exit_3(moto_s3, tmp_path, capsys):
    tree = write_mimic_jpg_tree(tmp_path / "mimic", n_studies=2, images_per_study=1)
    rc = main(["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
               "--out", "s3://no-such-bucket-lapvqa/x", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 3 and err.startswith("lapvqa.shard: I/O error: cannot write s3://no-such-bucket")
    assert "testing" not in err  # the (dummy) secret never appears


@pytest.mark.timeout(180)
def test_inputs_read_from_s3(moto_s3, tmp_path):
    tree = write_mimic_jpg_tree(tmp_path / "mimic", n_studies=4, faults=("missing_report",))
    src = open_store(moto_s3 + "/physionet")
    for base, prefix in ((tree.images_root, "jpg"), (tree.reports_dir, "reports")):
        for p in sorted(base.rglob("*")):
            if p.is_file():
                src.put_file_atomic(f"{prefix}/{p.relative_to(base).as_posix()}", p)
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["--samples-per-shard", "3", "--no-progress", "--workers", "1"]
    assert main(["--images", str(tree.images_root), "--reports", str(tree.reports_dir),
                 "--out", str(local), *common]) == 0
    assert main(["--images", src.url("jpg"), "--reports", src.url("reports"),
                 "--out", str(remote), *common]) == 0
    for p in local.glob("*.tar"):
        assert (remote / p.name).read_bytes() == p.read_bytes()
    assert (remote / "rejects.jsonl").read_bytes() == (local / "rejects.jsonl").read_bytes()
