"""Global pre-alignment for the fused strategy: matching says where a structure is and how large, warping outlines it.

A target is resampled so that the structure the patch classifier found sits where the reference's structure sits, at
the reference's size (a similarity transform without rotation: the warping network's affine head handles rotation
and shape). The warping network then registers aligned pairs, which it can do even when the structure moves and
changes size across the cohort (fetal heads, lesions), and its warped label is mapped back to the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["Frame", "label_frame", "probability_frame", "combine_frames", "to_reference", "from_reference"]


@dataclass(frozen=True)
class Frame:
    """Where a structure is and how large: centre (x, y) in pixels and size (square root of its area in pixels)."""

    x: float
    y: float
    size: float


def label_frame(mask: np.ndarray) -> Frame | None:
    """Frame of a binary mask (None when empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return Frame(float(xs.mean()), float(ys.mean()), float(np.sqrt(len(xs))))


def probability_frame(prob: np.ndarray, threshold: float = 0.5) -> Frame | None:
    """Frame of the most probable connected region of a (H, W) probability map (None when nothing reaches
    ``threshold``): probability-weighted centre, size from the region's area."""
    regions, n = ndimage.label(prob > threshold)
    if n == 0:
        return None
    mass = ndimage.sum(prob, regions, index=np.arange(1, n + 1))
    ys, xs = np.nonzero(regions == int(np.argmax(mass)) + 1)
    w = prob[ys, xs].astype(np.float64)
    return Frame(float((xs * w).sum() / w.sum()), float((ys * w).sum() / w.sum()), float(np.sqrt(len(xs))))


def combine_frames(frames: list[Frame]) -> Frame:
    """One frame for several structures: area-weighted centre, size from the total area."""
    areas = np.array([f.size**2 for f in frames])
    x = float((areas * [f.x for f in frames]).sum() / areas.sum())
    y = float((areas * [f.y for f in frames]).sum() / areas.sum())
    return Frame(x, y, float(np.sqrt(areas.sum())))


def _sample(x: torch.Tensor, px: torch.Tensor, py: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample (C, H, W) at pixel coordinates px, py (h, w) (pixel centres at integers; zeros outside)."""
    H, W = x.shape[-2:]
    grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], -1)[None].float()
    return F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def _pixels(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    py, px = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    return px.float(), py.float()


def to_reference(image: np.ndarray, frame: Frame, reference: Frame, shape: tuple[int, int]) -> np.ndarray:
    """Resample a (H, W) image so that ``frame`` lands on ``reference`` in an image of ``shape`` (zeros outside)."""
    s = frame.size / reference.size
    px, py = _pixels(shape)
    out = _sample(
        torch.from_numpy(np.asarray(image, np.float32))[None],
        frame.x + s * (px - reference.x),
        frame.y + s * (py - reference.y),
        "bilinear",
    )
    return out[0].numpy()


def from_reference(maps: torch.Tensor, frame: Frame, reference: Frame, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``to_reference`` for (K, RH, RW) maps in the reference frame: (K, H, W) in the target's."""
    s = frame.size / reference.size
    px, py = _pixels(size)
    return _sample(maps, reference.x + (px - frame.x) / s, reference.y + (py - frame.y) / s, "bilinear")
