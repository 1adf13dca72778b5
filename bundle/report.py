"""What a run writes besides its predictions: the metrics, review and errors tables, JSON summaries and a
self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
from typing import Any

__all__ = ["write_tables", "write_qc", "write_json", "write_report"]


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
    fields = [
        "id",
        "class",
        "source",
        "sam_iou",
        "sam_stability",
        "reference_stability",
        "locator_support",
        "found",
        "area_vs_reference",
        "confidence",
    ]
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


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.review td { background: #fff1e6; } img { max-width: 100%; border: 1px solid #ccc; }
.muted { color: #666; } .gallery img { width: 32%; margin: 0.3%; }
"""


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f'<td class="num">{_fmt(v)}</td>'
    return f"<td>{html.escape('' if v is None else str(v))}</td>"


def _table(head: list[str], rows: list[list[Any]], marks: list[bool] | None = None) -> str:
    marks = marks or [False] * len(rows)
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row, mark in zip(rows, marks):
        out.append(f'<tr{" class=review" if mark else ""}>' + "".join(_cell(v) for v in row) + "</tr>")
    return "\n".join(out + ["</table>"])


def _picture(path: str, alt: str) -> str:
    """An <img> with the PNG at ``path`` embedded, or nothing when it is missing."""
    if not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def write_report(output_dir: str, summary: dict[str, Any], qc_rows: list[dict[str, Any]]) -> str:
    """``report.html``: one self-contained page (pictures embedded) with the montage and its legend, the per-class
    scores, the fused source's decisions, the images to review with their signals, and the timings."""
    review = summary.get("review") or {}
    to_review = set(review.get("to_review", []))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>One-shot segmentation report</title>"
        f"<style>{_STYLE}</style></head><body>",
        "<h1>One-shot segmentation report</h1>",
        f"<p>{summary.get('num_images', 0)} images segmented, {summary.get('num_failed', 0)} failed; "
        f"<b>{review.get('num_to_review', 0)} to review</b>. Source: {html.escape(str(summary.get('source', '')))}."
        f"<br><span class=muted>Reference: {html.escape(json.dumps(summary.get('reference', summary.get('model'))))}"
        f"<br>Results: {html.escape(str(summary.get('output_dir', '')))}</span></p>",
        "<h2>Least confident images first</h2>",
        _picture(os.path.join(output_dir, "overlays", "montage.png"), "montage of the least confident images"),
    ]
    per_class = summary.get("per_class") or {}
    if summary.get("num_scored"):
        rows = [[n, f"{per_class[n]:.1f}", f"{summary['per_class_iou'][n]:.1f}"] for n in per_class]
        rows.append(["mean", f"{summary['dice_mean']:.1f}", f"{summary['iou_mean']:.1f}"])
        parts += ["<h2>Scores (images with a label)</h2>", _table(["class", "Dice %", "IoU %"], rows)]
        if "num_failures" in review:
            parts.append(
                f"<p class=muted>{review['num_failures']} of {review['num_scored']} scored images have a mean Dice "
                f"below 0.5; {_fmt_pct(review.get('failures_flagged'))} of them are flagged for review, and "
                f"{_fmt_pct(review.get('flagged_failing'))} of the flagged are below 0.5.</p>"
            )
    decisions = summary.get("strategy_decisions") or {}
    if decisions:
        keys = sorted({k for d in decisions.values() for k in d})
        parts += ["<h2>Which source serves each class</h2>"]
        parts.append(_table(["class", *keys], [[n, *[d.get(k) for k in keys]] for n, d in decisions.items()]))
    if qc_rows:
        head = list(qc_rows[0])
        parts += [
            "<h2>Review list</h2><p class=muted>Per image and class, least confident first (qc.csv); highlighted rows "
            "need review.</p>",
            _table(head, [[r[k] for k in head] for r in qc_rows], [r["id"] in to_review for r in qc_rows]),
        ]
    stages = summary.get("seconds_by_stage") or {}
    timing = [["total", summary.get("seconds_total")], ["per image", summary.get("seconds_per_image")]]
    timing += [[k, v] for k, v in stages.items()]
    parts += ["<h2>Time (s)</h2>", _table(["stage", "seconds"], [[k, _num(v)] for k, v in timing])]
    parts.append(f"<p class=muted>peak memory {summary.get('peak_memory_mb', '')} MB</p></body></html>")
    path = os.path.join(output_dir, "report.html")
    with open(path + ".part", "w") as f:
        f.write("\n".join(parts))
    os.replace(path + ".part", path)
    return path


def _num(v: Any) -> Any:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"
