"""Scoring a candidate mask by what does not change with the structure's size or position: how much more the
located class's probability is inside the mask than around it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["ring", "support"]


def ring(mask: np.ndarray, width: float = 0.25) -> np.ndarray:
    """The band just outside a boolean (H, W) mask, ``width`` times its equivalent radius wide (at least 2 pixels)."""
    radius = np.sqrt(mask.sum() / np.pi)
    steps = max(2, int(round(width * radius)))
    return ndimage.binary_dilation(mask, iterations=steps) & ~mask


def support(prob: np.ndarray, mask: np.ndarray, width: float = 0.25) -> float:
    """Mean of a (H, W) class probability map inside ``mask`` minus its mean in the ``ring`` around it, in [-1, 1]:
    near 1 for a mask that covers what the classifier located and no more; 0 for an empty mask."""
    if not mask.any():
        return 0.0
    band = ring(mask, width)
    outside = float(prob[band].mean()) if band.any() else 0.0
    return float(prob[mask].mean()) - outside


def regions(
    prob: np.ndarray, thresholds: tuple[float, ...] = (0.5, 0.3), max_regions: int = 3, min_pixels: int = 16
) -> list[np.ndarray]:
    """Connected regions of a (H, W) probability map at each threshold, at most ``max_regions`` per threshold by
    probability mass, without near-duplicates (IoU above 0.8 with one kept before)."""
    kept: list[np.ndarray] = []
    for t in thresholds:
        lab, n = ndimage.label(prob > t)
        if n == 0:
            continue
        mass = ndimage.sum(prob, lab, index=np.arange(1, n + 1))
        for i in np.argsort(-mass)[:max_regions]:
            region = lab == i + 1
            if region.sum() < min_pixels:
                continue
            if all((region & k).sum() / (region | k).sum() <= 0.8 for k in kept):
                kept.append(region)
    return kept
