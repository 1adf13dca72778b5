"""Scoring a candidate mask by what does not change with the structure's size or position: how much more the
located class's probability is inside the mask than around it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["appearance", "box_grid", "box_regions", "candidate_scores", "regions", "ring", "support"]


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


def box_grid(
    size: tuple[int, int], sides: tuple[float, ...] = (0.15, 0.25, 0.4, 0.6, 0.85), overlap: float = 1.5
) -> np.ndarray:
    """(N, 4) boxes (x0, y0, x1, y1) in pixels of an (H, W) image: square-in-share boxes of each side (a share of the
    image's height and width), laid on a regular grid of about ``overlap / side`` centres per axis."""
    H, W = size
    boxes = []
    for side in sides:
        side = min(float(side), 1.0)
        k = 1 if side >= 1 else max(1, int(round(overlap / side)))
        for cy in np.linspace(side / 2, 1 - side / 2, k):
            for cx in np.linspace(side / 2, 1 - side / 2, k):
                boxes.append([(cx - side / 2) * W, (cy - side / 2) * H, (cx + side / 2) * W, (cy + side / 2) * H])
    return np.asarray(boxes, np.float32)


def box_regions(boxes: np.ndarray, size: tuple[int, int], grid: tuple[int, int], share: float = 0.7) -> np.ndarray:
    """(N, h, w) boolean ellipses inscribed in N boxes (x0, y0, x1, y1) of an (H, W) image, ``share`` of each box's
    half-sides across, on an (h, w) grid of cells over the image."""
    (H, W), (h, w) = size, grid
    ys, xs = (np.arange(h) + 0.5) * H / h, (np.arange(w) + 0.5) * W / w
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    rx = np.maximum((boxes[:, 2] - boxes[:, 0]) / 2 * share, W / w / 2)
    ry = np.maximum((boxes[:, 3] - boxes[:, 1]) / 2 * share, H / h / 2)
    dy = (ys[None, :, None] - cy[:, None, None]) / ry[:, None, None]
    dx = (xs[None, None, :] - cx[:, None, None]) / rx[:, None, None]
    return dy**2 + dx**2 <= 1


def appearance(pooled: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """(N,) cosine of N candidates' mean features (N, D) to the reference class's (``inside``, D) less their cosine to
    its surroundings' (``outside``, D): above 0 where a candidate looks more like the structure than around it. With
    (V, D) ``inside`` and ``outside`` (V views of the reference, e.g. at other scales), the best view's."""
    unit = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-6)
    inside, outside = np.atleast_2d(inside), np.atleast_2d(outside)
    inside = inside / np.maximum(np.linalg.norm(inside, axis=1, keepdims=True), 1e-6)
    outside = outside / np.maximum(np.linalg.norm(outside, axis=1, keepdims=True), 1e-6)
    return (unit @ inside.T - unit @ outside.T).max(1)


def candidate_scores(
    pooled: np.ndarray,
    ring: np.ndarray,
    iou: np.ndarray,
    area: np.ndarray,
    inside: np.ndarray,
    outside: np.ndarray,
    ref_area: float,
    iou_weight: float = 0.25,
    size_weight: float = 0.05,
    ring_weight: float = 0.25,
) -> np.ndarray:
    """Score (N,) of N candidate masks for one class: the ``appearance`` of their mean features (N, D) (``inside`` /
    ``outside``: (D,) or (V, D)) less ``ring_weight`` times that of the band around them (``ring``, (N, D)), plus SAM's
    predicted IoU (N,), less a weak prior on the log ratio of their area share (N,) to the reference's."""
    prior = np.abs(np.log(np.maximum(area, 1e-4) / max(ref_area, 1e-4)))
    looks = appearance(pooled, inside, outside) - ring_weight * appearance(ring, inside, outside)
    return looks + iou_weight * iou - size_weight * prior
