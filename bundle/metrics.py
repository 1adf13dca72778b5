"""Dice and IoU per class per image with MONAI metrics, and their cohort summary."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU

from bundle.transforms import one_hot

__all__ = ["class_scores", "summarize"]

_dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
_iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)


def class_scores(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[str, list[float]]:
    """Dice and IoU per class (1..C) of two (H, W) label maps; NaN where the class is absent from both."""
    pred = one_hot(torch.from_numpy(prediction), num_classes)[None]
    gt = one_hot(torch.from_numpy(truth), num_classes)[None]
    dice = _dice(pred, gt)[0].tolist()
    iou = _iou(pred, gt)[0].tolist()
    # MONAI scores a class absent from the truth but predicted as 0 (a false positive) and absent from both as 1
    # with ignore_empty=False, NaN with True; a false positive must count as 0, so fix that case explicitly
    for c in range(num_classes):
        if not (truth == c + 1).any():
            fp = bool((prediction == c + 1).any())
            dice[c] = iou[c] = 0.0 if fp else math.nan
    return {"dice": dice, "iou": iou}


def summarize(rows: list[dict[str, list[float]]], names: list[str]) -> dict:
    """Mean over images, then over classes (NaNs ignored), in percent; ``missed_share``: % of images with mean Dice
    below 0.1."""
    out: dict = {"per_class": {}, "per_class_iou": {}}
    if not rows:
        return {"dice_mean": math.nan, "iou_mean": math.nan, **out}
    dice = np.array([r["dice"] for r in rows], dtype=float)
    iou = np.array([r["iou"] for r in rows], dtype=float)
    with np.errstate(all="ignore"):
        d_cls, i_cls = np.nanmean(dice, 0) * 100, np.nanmean(iou, 0) * 100
    for n, d, i in zip(names, d_cls, i_cls):
        out["per_class"][n] = round(float(d), 2)
        out["per_class_iou"][n] = round(float(i), 2)
    out["dice_mean"] = round(float(np.nanmean(d_cls)), 2)
    out["iou_mean"] = round(float(np.nanmean(i_cls)), 2)
    with np.errstate(all="ignore"):
        per_image = np.nanmean(dice, 1)
    scored = per_image[~np.isnan(per_image)]
    # an image is missed when its mean Dice over the classes it has is below 0.1
    out["missed_share"] = round(float((scored < 0.1).mean() * 100), 2) if scored.size else math.nan
    return out
