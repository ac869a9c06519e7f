"""Linear probes on generated NIH CXR-14 / CheXpert trees in their published layouts.

Images carry two independent textures, A (checkerboard) and B (stripes). In the 'learnable' trees
even-numbered classes are A and odd ones B, so a probe on a random-init tiny encoder's features
must beat chance clearly (and a column mix-up would show); in the 'null' trees labels are coin
flips independent of the pixels, so the AUCs must sit around 0.5 (no train/test leakage).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from lapvqa import probe, probe_data
from lapvqa.probe_data import CHEXPERT_CLASSES, NIH_CLASSES
from mimic_fixtures import htj2k_decodable, radiograph, relabelled_dicom, write_dicom
from release_helpers import make_release

N_TRAIN, N_TEST = 48, 32
CHEX_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                "Pleural Other", "Fracture", "Support Devices"]


def _texture_image(rng, a: bool, b: bool, size: int = 128) -> np.ndarray:
    img = rng.normal(110, 12, (size, size))
    yy, xx = np.mgrid[:size, :size]
    for present, pattern in ((a, ((yy // 4 + xx // 4) % 2) * 90.0), (b, ((yy // 3) % 2) * 90.0)):
        if present:
            y0, x0 = rng.integers(0, size // 3, 2)
            region = (slice(y0, y0 + size // 2), slice(x0, x0 + size // 2))
            img[region] += pattern[region]
    return np.clip(img, 0, 255).astype(np.uint8)


def _latents(rng, n: int):
    return rng.random(n) < 0.5, rng.random(n) < 0.5


def _labels(rng, a, b, n_classes: int, learnable: bool) -> np.ndarray:
    if learnable:
        return np.stack([a if j % 2 == 0 else b for j in range(n_classes)], axis=1).astype(int)
    return (rng.random((len(a), n_classes)) < 0.4).astype(int)


def make_nih(root, learnable: bool, seed: int = 0, missing: int = 1, corrupt: bool = True):
    """NIH layout: Data_Entry_2017_v2020.csv, split lists, 1024x1024 PNGs in images_00X/images/."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    a, b = _latents(rng, n)
    labels = _labels(rng, a, b, len(NIH_CLASSES), learnable)
    names = [f"{1000 + i:08d}_{i % 3:03d}.png" for i in range(n)]
    rows = []
    for i, name in enumerate(names):
        folder = root / ("images" if i % 4 == 0 else f"images_{1 + i % 2:03d}/images")
        folder.mkdir(parents=True, exist_ok=True)
        img = np.kron(_texture_image(rng, a[i], b[i]), np.ones((8, 8), np.uint8))  # 1024 x 1024
        Image.fromarray(img).save(folder / name)
        found = [c for c, y in zip(NIH_CLASSES, labels[i]) if y] or ["No Finding"]
        rows.append([name, "|".join(found), 0, i, 60, "M", "PA", 2500, 2048, 0.143, 0.143])
    ghosts = [f"9999999{i}_000.png" for i in range(missing)]  # in the csv, never downloaded
    rows += [[g, "Hernia", 0, 1, 60, "M", "PA", 2500, 2048, 0.143, 0.143] for g in ghosts]
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                    "OriginalImagePixelSpacing[x", "y]"])
        w.writerows(rows)
    if corrupt:  # a download cut short: the last test image is truncated
        path = next(root.glob(f"images*/**/{names[-1]}"))
        path.write_bytes(path.read_bytes()[:200])
    (root / "train_val_list.txt").write_text("\n".join(names[:N_TRAIN]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[N_TRAIN:] + ghosts) + "\n")
    return labels


def _chex_value(y: int, rng, cls: str, train: bool) -> str:
    """CheXpert's encodings; uncertain (-1) only where the default policy maps it to the truth."""
    r = rng.random()
    if train and r < 0.2 and ((cls in ("Atelectasis", "Edema")) == bool(y)):
        return "-1.0"
    if not y and r > 0.7:
        return ""  # not mentioned: negative
    return "1.0" if y else "0.0"


def make_chexpert(parent, learnable: bool, seed: int = 1):
    """CheXpert-v1.0-small/{train,valid}.csv with Paths relative to `parent`; non-square JPEGs."""
    rng = np.random.default_rng(seed)
    base = parent / "CheXpert-v1.0-small"
    for split, n, train in (("train", N_TRAIN, True), ("valid", N_TEST, False)):
        a, b = _latents(rng, n)
        labels = _labels(rng, a, b, len(CHEXPERT_CLASSES), learnable)
        rows = []
        for i in range(n):
            rel = f"CheXpert-v1.0-small/{split}/patient{i:05d}/study1/view1_frontal.jpg"
            (parent / rel).parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(_texture_image(rng, a[i], b[i])).resize((320, 390))
            img.save(parent / rel, quality=95)
            row = {c: "" for c in CHEX_COLUMNS}
            row.update({"Path": rel, "Sex": "Female", "Age": "68", "Frontal/Lateral": "Frontal",
                        "AP/PA": "AP"})
            for cls, y in zip(CHEXPERT_CLASSES, labels[i]):
                row[cls] = _chex_value(int(y), rng, cls, train)
            rows.append(row)
        with open(base / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CHEX_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return base


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    make_release(str(out), "tiny")
    return str(out)


def _run(tmp_path, release, dataset, root, *extra):
    out = tmp_path / f"{dataset}.json"
    rc = probe.main(["--release", release, "--dataset", dataset, "--root", str(root),
                     "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                     "--batch-size", "16", "--num-workers", "0", "--device", "cpu", *extra])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("learnable", [True, False], ids=["learnable", "null"])
def test_nih_probe(tmp_path, release, learnable, capsys):
    make_nih(tmp_path / "nih", learnable)
    res = _run(tmp_path, release, "nih", tmp_path / "nih")
    assert res["n_train"] == N_TRAIN and res["n_test"] == N_TEST - 1
    assert res["rejects"]["test"] == {"image file missing": 1, "image_truncated": 1}
    assert list(res["classes"]) == list(NIH_CLASSES) and res["classes_scored"] == 14
    aucs = [r["auc"] for r in res["classes"].values()]
    if learnable:
        assert res["mean_auc"] > 0.85 and min(aucs) > 0.7, aucs
    else:
        assert abs(res["mean_auc"] - 0.5) < 0.12, aucs
    assert "mean (14 classes)" in capsys.readouterr().out
    # second run: every feature comes from the cache, the encoder is never loaded
    again = _run(tmp_path, release, "nih", tmp_path / "nih")
    assert again["features_cached"] == {"train": True, "test": True}
    assert again["classes"] == res["classes"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("learnable", [True, False], ids=["learnable", "null"])
def test_chexpert_probe(tmp_path, release, learnable):
    base = make_chexpert(tmp_path / "data", learnable)
    res = _run(tmp_path, release, "chexpert", base)  # root = the dataset folder itself
    assert res["n_train"] == N_TRAIN and res["n_test"] == N_TEST
    assert list(res["classes"]) == list(CHEXPERT_CLASSES)
    assert res["uncertain_policy"]["Edema"] == "ones" and res["uncertain_policy"]["Cardiomegaly"] == "zeros"
    if learnable:
        assert res["mean_auc"] > 0.85, res["classes"]
    else:
        assert abs(res["mean_auc"] - 0.5) < 0.2, res["classes"]


def test_chexpert_paths_and_uncertain_policies(tmp_path):
    base = make_chexpert(tmp_path, learnable=True)
    raw = list(csv.DictReader(open(base / "train.csv")))
    by_parent = probe_data.read_chexpert(str(tmp_path), "train")  # root = the parent
    by_base = probe_data.read_chexpert(str(base), "train")
    assert by_parent.paths == by_base.paths and len(by_base) == N_TRAIN
    assert all(os.path.isfile(p) for p in by_base.paths)
    ones = probe_data.read_chexpert(str(base), "train", uncertain="ones").labels
    zeros = probe_data.read_chexpert(str(base), "train", uncertain="zeros").labels
    ignore = probe_data.read_chexpert(str(base), "train", uncertain="ignore").labels
    mixed = probe_data.read_chexpert(str(base), "train", uncertain="Atelectasis=zeros").labels
    n_uncertain = 0
    for i, row in enumerate(raw):
        for j, cls in enumerate(CHEXPERT_CLASSES):
            v = row[cls]
            if v == "-1.0":
                n_uncertain += 1
                assert ones[i, j] == 1 and zeros[i, j] == 0 and np.isnan(ignore[i, j])
                default = 1.0 if cls in ("Atelectasis", "Edema") else 0.0
                assert by_base.labels[i, j] == default
                assert mixed[i, j] == (0.0 if cls == "Atelectasis" else default)
            else:
                assert by_base.labels[i, j] == (float(v) if v else 0.0)  # blank = negative
    assert n_uncertain > 5
    with pytest.raises(probe_data.ProbeDataError, match="CLASS=ones"):
        probe_data.uncertain_policy("Edema=maybe")


def test_nih_reader_layout_and_no_finding(tmp_path):
    labels = make_nih(tmp_path, learnable=True, missing=2, corrupt=False)
    split = probe_data.read_nih(str(tmp_path), "test")
    assert len(split) == N_TEST and split.rejects == {"image file missing": 2}
    assert {os.path.basename(os.path.dirname(os.path.dirname(p))) for p in split.paths} >= \
        {"images_001", "images_002"} or any("/images/" in p for p in split.paths)
    np.testing.assert_array_equal(split.labels, labels[N_TRAIN:])
    assert (split.labels.sum(1) == 0).any()  # 'No Finding' rows are all-zero


def test_fit_probe_one_valued_class_is_na():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    y = np.stack([x[:, 0] > 0, np.zeros(40), np.r_[np.arange(20) % 2, np.ones(20)]], 1).astype(float)
    res = probe.fit_probe(x[:20], y[:20], x[20:], y[20:], ("a", "b", "c"))
    assert res["a"]["auc"] > 0.9
    assert res["b"]["auc"] is None and res["b"]["note"] == "train labels take one value"
    assert res["c"]["auc"] is None and res["c"]["note"] == "test labels take one value"


def test_cli_refuses_bad_root(tmp_path, release, capsys):
    rc = probe.main(["--release", release, "--dataset", "nih", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Data_Entry_2017" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.timeout(120)
def test_missing_dicom_decoder_stops_with_one_line_from_a_worker(tmp_path, release, capsys):
    """An image needing a decoder this environment lacks (raised in a DataLoader worker) ends
    the probe with the one-line reason, like the sharder, not a worker traceback."""
    if htj2k_decodable():
        pytest.skip("an HTJ2K decoder is installed here")
    make_nih(tmp_path / "nih", True, missing=0, corrupt=False)
    write_dicom(tmp_path / "x.dcm", radiograph(300, 260).astype(np.float32) * 16)
    victim = sorted((tmp_path / "nih").rglob("*.png"))[0]
    victim.write_bytes(relabelled_dicom(tmp_path / "x.dcm"))  # content decides, not the name
    rc = probe.main(["--release", release, "--dataset", "nih", "--root", str(tmp_path / "nih"),
                     "--cache-dir", str(tmp_path / "cache"), "--num-workers", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: DICOM transfer syntax 1.2.840.10008.1.2.4.201")
    assert "pylibjpeg-openjpeg" in err[-1] and not any("Traceback" in line for line in err)
