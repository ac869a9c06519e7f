"""A PNG grid of test radiographs with their generated and true reports (matplotlib, Agg)."""

from __future__ import annotations

import os
import textwrap

import numpy as np
from PIL import Image

from lapvqa.synth.labeler import present
from lapvqa.synth.phrases import FINDING_KEYS

_SHORT = {"cardiomegaly": "cardiomeg.", "effusion": "effusion", "pneumothorax": "pneumothorax",
          "devices": "devices", "consolidation": "consolid."}


def _image(root: str, rec: dict, dicom_id: str, size: int = 320) -> np.ndarray:
    s = str(rec["subject_id"])
    path = os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{rec['study_id']}",
                        f"{dicom_id}.jpg")
    img = Image.open(path).convert("L")
    img.thumbnail((size, size))
    return np.asarray(img)


def pick_rows(rows: list[dict], truth: dict[int, dict], n: int) -> list[dict]:
    """A spread of test images: one study each, alternating normal and abnormal ones."""
    seen, normal, abnormal = set(), [], []
    for r in sorted(rows, key=lambda r: r.get("key", "")):
        rec = truth.get(r.get("study_id"))
        if rec is None or r["study_id"] in seen:
            continue
        seen.add(r["study_id"])
        (abnormal if any(rec["truth"].values()) else normal).append(r)
    picked = []
    while len(picked) < n and (normal or abnormal):
        for pool in (abnormal, normal, abnormal):
            if pool and len(picked) < n:
                picked.append(pool.pop(0))
    return picked


def _caption(row: dict, rec: dict) -> str:
    said = present(row["generated"])
    marks = "  ".join(f"{_SHORT[k]}{'+' if rec['truth'][k] else '-'}"
                      f"{'' if said[k] == bool(rec['truth'][k]) else '(x)'}" for k in FINDING_KEYS)
    return ("TRUE: " + marks + "\n\nGENERATED:\n" + _wrap(row["generated"] or "(empty)")
            + "\n\nREFERENCE:\n" + _wrap(row.get("reference") or "-"))


def _wrap(text: str, width: int = 62, max_lines: int = 12) -> str:
    lines = textwrap.wrap(text, width)
    return "\n".join(lines[:max_lines] + (["..."] if len(lines) > max_lines else []))


def report_grid(rows: list[dict], truth: dict[int, dict], data_root: str, out: str,
                n: int = 8, cols: int = 4) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = pick_rows(rows, truth, n)
    if not picked:
        raise ValueError("no generated test report belongs to a synthetic study")
    nrows = (len(picked) + cols - 1) // cols
    fig = plt.figure(figsize=(4.2 * cols, 6.8 * nrows))
    cell_h, cell_w = 0.96 / nrows, 1 / cols  # the top 4% holds the title
    for i, row in enumerate(picked):
        rec = truth[row["study_id"]]
        left, top = (i % cols) * cell_w + 0.01, 0.96 - (i // cols) * cell_h
        ax = fig.add_axes([left, top - 0.5 * cell_h, cell_w - 0.02, 0.48 * cell_h])
        ax.imshow(_image(data_root, rec, row["dicom_id"]), cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
        ax.set_title(f"study s{row['study_id']}", fontsize=8)
        fig.text(left, top - 0.52 * cell_h, _caption(row, rec), fontsize=5.6, va="top", ha="left",
                 family="monospace")
    fig.suptitle("Test images: generated vs. reference reports; TRUE = what the image shows "
                 "(+ present, - absent, (x) the generated report disagrees)", fontsize=10, y=0.995)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
