"""Corrects one structure's mask on one image from an annotator's clicks, with the frozen SAM and a cached embedding.

The clicks and the mask being corrected become one prompt set: the box around the mask and the foreground clicks,
the clicks as points, the mask as SAM's mask prompt. SAM's three candidate masks and its single-mask answer are
ranked by how many clicks each honours (foreground inside, background outside), then by how little they change the
mask outside what was clicked; each candidate also enters as a local edit of the mask (only the part around a click
changes), so that a click fixes what it points at without redrawing the rest.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from bundle.prompts import mask_to_box
from bundle.sam import Embedding, SamBackend

__all__ = ["correct_mask", "clicks_honoured", "local_edit"]


def _pixel(shape: tuple[int, ...], x: float, y: float) -> tuple[int, int]:
    """(row, column) of the pixel holding point (x, y), clipped to a (H, W) image."""
    return int(np.clip(round(y), 0, shape[0] - 1)), int(np.clip(round(x), 0, shape[1] - 1))


def clicks_honoured(mask: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> int:
    """How many clicks a (H, W) bool mask agrees with: foreground (P, 2) inside, background (Q, 2) outside; points
    as (x, y) pixels."""
    h, w = mask.shape

    def inside(points: np.ndarray) -> np.ndarray:
        if len(points) == 0:
            return np.zeros(0, bool)
        x = np.clip(np.rint(points[:, 0]).astype(int), 0, w - 1)
        y = np.clip(np.rint(points[:, 1]).astype(int), 0, h - 1)
        return mask[y, x]

    return int(inside(foreground).sum() + (~inside(background)).sum())


def _box(
    previous: np.ndarray | None, foreground: np.ndarray, size: tuple[int, int], margin: float
) -> np.ndarray | None:
    """(4,) box around the previous mask and the foreground clicks, clicks outside the mask given ``margin`` px of
    room; None without either."""
    corners = []
    if previous is not None and previous.any():
        corners.append(mask_to_box(previous).reshape(2, 2))
    for x, y in foreground:
        if previous is None or not previous[_pixel(size, x, y)]:
            corners.append(np.array([[x - margin, y - margin], [x + margin, y + margin]]))
    if not corners:
        return None
    pts = np.concatenate(corners)
    lo, hi = pts.min(0), pts.max(0)
    return np.array([max(lo[0], 0), max(lo[1], 0), min(hi[0], size[1] - 1), min(hi[1], size[0] - 1)], np.float32)


def _component(region: np.ndarray, x: float, y: float) -> np.ndarray:
    """The 8-connected part of a (H, W) bool ``region`` holding pixel (x, y) (empty when it is not in it)."""
    pixel = _pixel(region.shape, x, y)
    if not region[pixel]:
        return np.zeros_like(region)
    _, labels = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
    return labels == labels[pixel]


def local_edit(
    candidate: np.ndarray, previous: np.ndarray, foreground: np.ndarray, background: np.ndarray
) -> np.ndarray:
    """``previous`` changed only where a click asks: a foreground click outside it adds the part of ``candidate``
    around the click, a background click inside it removes the part ``candidate`` leaves out around the click."""
    out = previous.copy()
    for x, y in foreground:
        out |= _component(candidate & ~out, x, y)
    for x, y in background:
        out &= ~_component(out & ~candidate, x, y)
    return out


def disk_edit(previous: np.ndarray, foreground: np.ndarray, background: np.ndarray, radius: float) -> np.ndarray:
    """What the clicks ask of ``previous`` at the least: around a foreground click outside it, the largest disk clear
    of it is added; around a background click inside it, the largest disk inside it is removed (at most ``radius``
    px; a click is placed inside the error it points at)."""
    out = previous.copy()
    h, w = out.shape
    yy, xx = np.mgrid[:h, :w]
    for points, add in ((foreground, True), (background, False)):
        for x, y in points:
            pixel = _pixel(out.shape, x, y)
            if out[pixel] == add:
                continue
            region = (~out if add else out).astype(np.uint8)
            r = min(float(cv2.distanceTransform(region, cv2.DIST_L2, 5)[pixel]), radius) if out.any() else radius
            disk = (xx - x) ** 2 + (yy - y) ** 2 <= max(r, 1.0) ** 2
            out = out | disk if add else out & ~disk
    return out


@torch.no_grad()
def correct_mask(
    sam: SamBackend,
    embedding: Embedding,
    previous: np.ndarray | None,
    foreground: np.ndarray,
    background: np.ndarray,
    margin: float = 0.05,
    keep_edit: float = 0.9,
) -> tuple[np.ndarray, float]:
    """The corrected (H, W) bool mask of one structure and SAM's predicted IoU for it.

    Args:
        embedding: the image's SAM embedding (from the store: encoded once, reused for every click).
        previous: (H, W) bool, the mask being corrected (None or empty: clicks only).
        foreground / background: (P, 2) / (Q, 2) clicks as (x, y) pixels of the image.
        margin: room around a foreground click outside the mask, as a share of the image's longer side.
        keep_edit: a SAM mask replaces the least edit the clicks ask for (``disk_edit``) only when their IoU is at
            least this.
    """
    size = embedding.original_size
    foreground = np.asarray(foreground, np.float32).reshape(-1, 2)
    background = np.asarray(background, np.float32).reshape(-1, 2)
    if len(foreground) + len(background) == 0:
        raise ValueError("no click: give foreground or background points")
    prev = np.zeros(size, bool) if previous is None else previous.astype(bool)
    intent = disk_edit(prev, foreground, background, margin * max(size))
    box = _box(intent, foreground, size, margin * max(size))
    points = torch.from_numpy(np.concatenate([foreground, background]))[None]
    labels = torch.tensor([[1] * len(foreground) + [0] * len(background)])
    kwargs = {"points": points, "point_labels": labels}
    if box is not None:
        kwargs["boxes"] = torch.from_numpy(box)[None]
    candidates: list[tuple[np.ndarray, float]] = []
    mask_inputs = [None]
    if intent.any():
        mask_inputs.append(sam.mask_prompt(torch.from_numpy(intent.astype(np.float32))[None], size))
    for mask_logits in mask_inputs:
        for multimask in (False, True):
            logits, iou = sam.predict(embedding, mask_logits=mask_logits, multimask=multimask, **kwargs)
            candidates += [(m > 0, float(s)) for m, s in zip(logits[0].cpu().numpy(), iou[0].cpu())]
    if not prev.any():
        return max(candidates, key=lambda c: (clicks_honoured(c[0], foreground, background), c[1]))
    candidates += [(local_edit(m, prev, foreground, background), s) for m, s in candidates]

    def overlap(mask: np.ndarray) -> float:
        if mask is intent:  # the least edit itself, preferred unless SAM redraws it closely
            return keep_edit
        return float((mask & intent).sum()) / max(float((mask | intent).sum()), 1.0)

    candidates.append((intent, float("nan")))

    # of the masks that honour the most clicks, the closest to the least edit the clicks ask for
    return max(candidates, key=lambda c: (clicks_honoured(c[0], foreground, background), overlap(c[0])))
