"""What a run writes besides its predictions: the metrics and errors tables and JSON summaries."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

__all__ = ["write_tables", "write_qc", "write_json"]


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def write_tables(output_dir: str, rows: list[dict], errors: list[dict[str, str]], class_names: list[str]) -> None:
    """``metrics.csv`` (Dice and IoU per image and class) and ``errors.csv`` (skipped inputs, removed when none)."""
    with open(os.path.join(output_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id"] + [f"dice_{n}" for n in class_names] + [f"iou_{n}" for n in class_names])
        for r in rows:
            writer.writerow([r["id"]] + [_fmt(v) for v in r["dice"]] + [_fmt(v) for v in r["iou"]])
    errors_csv = os.path.join(output_dir, "errors.csv")
    if errors:
        with open(errors_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "image", "error"])
            writer.writeheader()
            writer.writerows(errors)
    elif os.path.exists(errors_csv):  # left by an earlier run of this output directory
        os.remove(errors_csv)


def write_qc(output_dir: str, rows: list[dict[str, Any]]) -> None:
    """``qc.csv``: per target and class, the review signals (``bundle.handlers.ReviewFlags``), in the rows' order."""
    fields = ["id", "class", "source", "sam_iou", "locator_support", "found", "area_vs_reference", "confidence"]
    fields += ["needs_review", "dice"]
    with open(os.path.join(output_dir, "qc.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(v) if isinstance(v, float) or v is None else v for k, v in r.items()})


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write JSON under a temporary name and rename it, so a crash never leaves a half-written file."""
    with open(path + ".part", "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(path + ".part", path)
