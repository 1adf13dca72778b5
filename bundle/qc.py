"""Review flags: how far each image's result for a class strays from the cohort's typical one.

No ground truth is needed. Per class, over the cohort, the robust centre and spread (median, scaled median absolute
deviation) of SAM's predicted IoU, of the locator's support of the mask and of the log area relative to the
reference; an image whose IoU or support lies far below the cohort's (or below an absolute floor), whose area lies far
from the cohort's, or where the class was not found, is flagged for review. So is one whose outline SAM finds much
softer than the reference's true outline (``outline_stability``), which needs no cohort: it still flags failures in a
cohort where failing is the norm.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bundle.layout import components
from bundle.prompts import masks_to_boxes
from bundle.sam import Embedding, SamBackend
from bundle.store import EmbeddingStore, Reference

__all__ = ["area_fractions", "confidence", "flag_check", "outline_stability", "reference_stability", "robust_z"]
__all__ += ["stability", "REVIEW_BELOW"]

REVIEW_BELOW = 0.5  # a class result with a confidence below this needs review
# the smallest spreads: differences below these are noise, never a reason to review
IOU_SPREAD = 0.05
SUPPORT_SPREAD = 0.1
AREA_SPREAD = 1.5  # a factor
MIN_SUPPORT = 0.1  # a mask the locator backs less than this (inside minus around) needs review
STABILITY_DROP = 0.065  # a mask whose outline is this much less stable than a right one's needs review
STABILITY_SHARE = 0.75  # a right outline: the reference's, unless this quantile of the cohort's is less stable
STABILITY_WIDTH = 0.05  # confidence falls from 1 to 0 over twice this around that point


def area_fractions(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, the largest share of a slice it covers in a (Z, H, W) class-index label map: (C,)."""
    flat = label.reshape(len(label), -1)
    return np.array([(flat == c + 1).mean(1).max() for c in range(num_classes)], dtype=float)


def stability(logits: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """Per class of (C, H, W) logits, the area above ``offset`` over the area above ``-offset`` (C,): near 1 for a
    sharp outline, lower where SAM hesitates over where the boundary lies; NaN for a class empty at ``-offset``."""
    flat = logits.flatten(1)
    wide = (flat > -offset).sum(1).double()
    return torch.where(wide > 0, (flat > offset).sum(1).double() / wide.clamp(min=1), torch.nan)


def outline_stability(sam: SamBackend, embedding: Embedding, mask: np.ndarray, parts: int = 1) -> float:
    """``stability`` of SAM's answer to the boxes of a (H, W) boolean ``mask``'s ``parts`` largest components (their
    logits' maximum): how sharp SAM finds the outline of what the mask covers; NaN for an empty mask."""
    found = components(mask, min_share=0.1)[: max(int(parts), 1)]
    if not found:
        return float("nan")
    boxes, _ = masks_to_boxes(np.stack(found))
    logits, _ = sam.predict(embedding, boxes=boxes)
    return float(stability(logits[:, 0].amax(0, keepdim=True).float().cpu())[0])


def reference_stability(store: EmbeddingStore, reference: Reference) -> np.ndarray:
    """Per class of ``reference``, the ``outline_stability`` of its true mask: how sharp a right outline is in this
    kind of image (C,); NaN for a class the label lacks."""
    embedding = store.reference_embedding(reference)
    parts = reference.parts
    return np.array(
        [outline_stability(store.sam, embedding, reference.label == c + 1, parts[c]) for c in range(len(parts))]
    )


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


def confidence(
    iou: np.ndarray,
    area: np.ndarray,
    found: np.ndarray,
    support: np.ndarray | None = None,
    stable: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """Per image and class, in [0, 1], from SAM's predicted ``iou`` (N, C; NaN: not measured), ``area`` relative to
    the reference (N, C), ``found`` (N, C) boolean, the locator's ``support`` of the mask (N, C; NaN or None: not
    measured) and the ``stability`` of its outline (N, C) against the ``reference_stability`` (C,). 1 within one
    robust standard unit of the cohort's centre on every signal, falling to 0 at four units (IoU and support: only
    below the centre; area: either side); below 0.5 also where SAM's IoU is below 0.5, the support below
    ``MIN_SUPPORT`` or the stability more than ``STABILITY_DROP`` below the reference's (at most the cohort's
    ``STABILITY_SHARE`` quantile), whatever the cohort's spread (when most of a cohort fails, failing is its norm); 0
    where not found."""
    support = np.full(iou.shape, np.nan) if support is None else support
    stable = np.full(iou.shape, np.nan) if stable is None else stable
    reference = np.full(iou.shape[1], np.nan) if reference is None else np.asarray(reference, dtype=float)
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
        values = stable[ok, c][~np.isnan(stable[ok, c])]
        if not np.isnan(reference[c]) and values.size:
            # the reference says how sharp a right outline is in these images (capped by the cohort's sharper
            # quarter, for a reference sharper than its kind); a much softer one outlines something else
            anchor = min(reference[c], float(np.quantile(values, STABILITY_SHARE)))
            drop = anchor - np.nan_to_num(stable[:, c], nan=anchor)
            scores.append(np.clip(0.5 - (drop - STABILITY_DROP) / (2 * STABILITY_WIDTH), 0, 1))
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
