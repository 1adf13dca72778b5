"""How well the review flags find the failures of finished runs: one table row per run, from its ``qc.csv``.

    python scripts/review_table.py /tmp/b/conf_jsrt/jsrt/bundle/qc.csv /tmp/b/conf_hc18/hc18/bundle/qc.csv ...

The flags are recomputed from each qc.csv's signals (SAM IoU, outline stability and the reference's, locator support,
area, found; a qc.csv from before the stability columns is recounted without them) with today's rule
(``bundle.qc.confidence``), so runs made before a rule change are judged by the same rule. A failure is an image
whose mean Dice over its classes is below 0.5 (the qc.csv's ``dice`` column: runs on labelled images only).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.qc import REVIEW_BELOW, confidence, flag_check  # noqa: E402


def _value(text: str | None) -> float:
    return float(text) if text not in ("", None) else np.nan


def review_row(path: str) -> dict[str, object]:
    """Images, flagged images and ``flag_check``'s counts for one qc.csv."""
    rows = list(csv.DictReader(open(path, newline="")))
    ids = list(dict.fromkeys(r["id"] for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    index, column = {i: k for k, i in enumerate(ids)}, {c: k for k, c in enumerate(classes)}
    iou, stable, support, area, dice = (np.full((len(ids), len(classes)), np.nan) for _ in range(5))
    anchor = np.full(len(classes), np.nan)
    for r in rows:
        i, c = index[r["id"]], column[r["class"]]
        iou[i, c], support[i, c] = _value(r["sam_iou"]), _value(r["locator_support"])
        area[i, c], dice[i, c] = _value(r["area_vs_reference"]), _value(r["dice"])
        stable[i, c], anchor[c] = _value(r.get("sam_stability")), _value(r.get("reference_stability"))
    flagged = confidence(iou, area, area > 0, support, stable, anchor).min(1) < REVIEW_BELOW
    truth = {i: list(dice[k]) for i, k in index.items() if not np.isnan(dice[k]).all()}
    return {"images": len(ids), "flagged": int(flagged.sum()), **flag_check(ids, flagged, truth)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("qc", nargs="+", help="qc.csv files of finished runs")
    args = p.parse_args()
    print("| run | images | flagged | failures (Dice < 0.5) | failures flagged | flagged that fail |")
    print("|---|---|---|---|---|---|")
    for path in args.qc:
        r = review_row(path)
        fails, both = r.get("num_failures", 0), r.get("num_failures_flagged", 0)
        recall = f"{both} of {fails}" if fails else "-"
        precision = f"{both} of {r['flagged']}" if r["flagged"] else "-"
        share = 100 * r["flagged"] / max(r["images"], 1)
        print(f"| {path} | {r['images']} | {r['flagged']} ({share:.0f}%) | {fails} | {recall} | {precision} |")


if __name__ == "__main__":
    main()
