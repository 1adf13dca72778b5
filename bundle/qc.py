"""Review flags: how far each image's result for a class strays from the cohort's typical one.

No ground truth is needed. Per class, over the cohort, the robust centre and spread (median, scaled median absolute
deviation) of SAM's predicted IoU, of the locator's support of the mask and of the log area relative to the
reference; an image whose IoU or support lies far below the cohort's (or below an absolute floor), whose area lies far
from the cohort's, or where the class was not found, is flagged for review.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["area_fractions", "confidence", "flag_check", "robust_z", "REVIEW_BELOW"]

REVIEW_BELOW = 0.5  # a class result with a confidence below this needs review
# the smallest spreads: differences below these are noise, never a reason to review
IOU_SPREAD = 0.05
SUPPORT_SPREAD = 0.1
AREA_SPREAD = 1.5  # a factor
MIN_SUPPORT = 0.1  # a mask the locator backs less than this (inside minus around) needs review


def area_fractions(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, the largest share of a slice it covers in a (Z, H, W) class-index label map: (C,)."""
    flat = label.reshape(len(label), -1)
    return np.array([(flat == c + 1).mean(1).max() for c in range(num_classes)], dtype=float)


def robust_z(values: np.ndarray, floor: float) -> np.ndarray:
    """(N,) values in robust standard units from their median (NaN stays NaN); ``floor``: the smallest spread."""
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return np.full_like(values, np.nan)
    centre = np.median(valid)
    spread = max(1.4826 * float(np.median(np.abs(valid - centre))), floor)
    return (values - centre) / spread


def _low(z: np.ndarray) -> np.ndarray:
    """1 down to one robust unit below the centre, falling to 0 at four below (NaN: 1)."""
    return np.clip(1 - (-np.nan_to_num(z, nan=0.0) - 1) / 3, 0, 1)


def confidence(iou: np.ndarray, area: np.ndarray, found: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
    """Per image and class, in [0, 1], from SAM's predicted ``iou`` (N, C; NaN: not measured), ``area`` relative to
    the reference (N, C), ``found`` (N, C) boolean and the locator's ``support`` of the mask (N, C; NaN or None: not
    measured). 1 within one robust standard unit of the cohort's centre on every signal, falling to 0 at four units
    (IoU and support: only below the centre; area: either side); below 0.5 also where SAM's IoU is below 0.5 or the
    support below ``MIN_SUPPORT`` whatever the cohort; 0 where not found."""
    support = np.full(iou.shape, np.nan) if support is None else support
    out = np.zeros(iou.shape, dtype=float)
    for c in range(iou.shape[1]):
        ok = found[:, c]
        z_iou = robust_z(np.where(ok, iou[:, c], np.nan), floor=IOU_SPREAD)
        z_support = robust_z(np.where(ok, support[:, c], np.nan), floor=SUPPORT_SPREAD)
        log_area = np.where(ok & (area[:, c] > 0), np.log(np.maximum(area[:, c], 1e-12)), np.nan)
        z_area = robust_z(log_area, floor=np.log(AREA_SPREAD))
        s_area = np.clip(1 - (np.abs(np.nan_to_num(z_area, nan=0.0)) - 1) / 3, 0, 1)
        # absolute floors, for a cohort where failures are too many to stand out: SAM itself doubts its mask
        # (predicted IoU near 0.5), or the locator finds the structure hardly more inside the mask than around it
        a_iou = np.clip((np.nan_to_num(iou[:, c], nan=1.0) - 0.3) / 0.4, 0, 1)
        a_support = np.clip(np.nan_to_num(support[:, c], nan=1.0) / (2 * MIN_SUPPORT), 0, 1)
        scores = [_low(z_iou), _low(z_support), s_area, a_iou, a_support]
        out[:, c] = np.where(ok, np.minimum.reduce(scores), 0.0)
    return out


def flag_check(ids: list[str], flagged: np.ndarray, dice: dict[str, list[float]]) -> dict[str, Any]:
    """Where labels exist: targets with mean Dice below 0.5 (failures), the share of them flagged, and the share of
    the flagged that are failures (percent; None when there is nothing to divide by)."""
    scored = [(f, np.nanmean(np.array(dice[i], dtype=float))) for i, f in zip(ids, flagged) if i in dice]
    scored = [(f, d) for f, d in scored if not np.isnan(d)]
    if not scored:
        return {}
    fail = np.array([d < 0.5 for _, d in scored])
    flag = np.array([f for f, _ in scored])

    def share(a: np.ndarray, b: np.ndarray) -> float | None:
        return round(float((a & b).sum() / b.sum() * 100), 1) if b.sum() else None

    return {
        "num_failures": int(fail.sum()),
        "num_failures_flagged": int((fail & flag).sum()),
        "failures_flagged": share(flag, fail),
        "flagged_failing": share(fail, flag),
        "num_scored": len(scored),
        "num_flagged_scored": int(flag.sum()),
    }
