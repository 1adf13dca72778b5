"""ProMISe's post-processing (morphological opening) against the bundle's own (parts kept + holes filled), measured on
the predictions of finished benchmark runs; nothing is re-run.

    python scripts/opening_compare.py /tmp/b/tune_jsrt/jsrt /tmp/b/tune_hc18/hc18 ... [--radii 0.005 0.01 0.02]

Each run folder holds ``datalist/dataset.json`` (first case = the reference) and ``bundle/predictions``. Opening is
applied per class to the bundle's output with a disk whose radius is a share of the image's longer side (one setting
for every set); the pixels it removes become background. Prints mean Dice per run and radius.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.io import case_id, read_label, to_class_index  # noqa: E402
from bundle.metrics import class_scores, summarize  # noqa: E402


def opened(label: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) class indices with every class opened by a disk of ``radius`` pixels (0: unchanged)."""
    if radius <= 0:
        return label
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = yy**2 + xx**2 <= radius**2
    out = np.zeros_like(label)
    for c in np.unique(label):
        if c > 0:
            out[ndimage.binary_opening(label == c, structure=disk)] = c
    return out


def score(run_dir: str, radii: list[float]) -> dict[float, float]:
    with open(os.path.join(run_dir, "datalist", "dataset.json")) as f:
        spec = json.load(f)
    values = sorted(int(k) for k in spec["labels"] if int(k) > 0)
    names = [spec["labels"][str(v)] for v in values]
    predictions = os.path.join(run_dir, "bundle", "predictions")
    found = {os.path.splitext(n)[0]: os.path.join(predictions, n) for n in os.listdir(predictions)}
    rows: dict[float, list] = {r: [] for r in radii}
    for item in spec["training"][1:]:
        key = case_id(item["image"])
        if key not in found:
            continue
        truth = to_class_index(read_label(item["label"]), values)
        pred = np.asarray(read_label(found[key])).astype(np.int64)
        for r in radii:
            size = int(round(r * max(pred.shape)))
            rows[r].append(class_scores(opened(pred, size), truth, len(values)))
    return {r: summarize(rows[r], names)["dice_mean"] for r in radii}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--radii", nargs="+", type=float, default=[0.0, 0.005, 0.01, 0.02])
    args = parser.parse_args()
    print("| run | " + " | ".join("as run" if r == 0 else f"opening r={r:g}" for r in args.radii) + " |")
    print("|---" * (len(args.radii) + 1) + "|")
    for run in args.runs:
        result = score(run, args.radii)
        print(f"| {run} | " + " | ".join(f"{result[r]:.1f}" for r in args.radii) + " |")


if __name__ == "__main__":
    main()
