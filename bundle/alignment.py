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
from skimage.morphology import convex_hull_image

__all__ = [
    "Frame",
    "label_frame",
    "probability_frame",
    "probable_region",
    "probable_regions",
    "inscribed_circle",
    "candidate_frames",
    "combine_frames",
    "solidity",
    "gradient_magnitude",
    "boundary_strength",
    "to_reference",
    "from_reference",
]


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


def probable_region(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """The most probable connected region of a (H, W) probability map above ``threshold`` (None when none)."""
    regions, n = ndimage.label(prob > threshold)
    if n == 0:
        return None
    mass = ndimage.sum(prob, regions, index=np.arange(1, n + 1))
    return regions == int(np.argmax(mass)) + 1


def probable_regions(prob: np.ndarray, count: int, threshold: float = 0.5, min_share: float = 0.1) -> list[np.ndarray]:
    """Up to ``count`` connected regions of a (H, W) probability map above ``threshold``, most probable first (by
    probability mass), each with at least ``min_share`` of the first one's mass ([] when none)."""
    regions, n = ndimage.label(prob > threshold)
    if n == 0:
        return []
    mass = ndimage.sum(prob, regions, index=np.arange(1, n + 1))
    order = np.argsort(-mass, kind="stable")[: max(int(count), 1)]
    return [regions == int(i) + 1 for i in order if mass[i] >= min_share * mass[order[0]]]


def probability_frame(prob: np.ndarray, threshold: float = 0.5) -> Frame | None:
    """Frame of the most probable connected region of a (H, W) probability map (None when nothing reaches
    ``threshold``): probability-weighted centre, size from the region's area."""
    region = probable_region(prob, threshold)
    if region is None:
        return None
    ys, xs = np.nonzero(region)
    w = prob[ys, xs].astype(np.float64)
    return Frame(float((xs * w).sum() / w.sum()), float((ys * w).sum() / w.sum()), float(np.sqrt(len(xs))))


def inscribed_circle(mask: np.ndarray) -> tuple[float, float, float]:
    """Centre (x, y) and radius of the largest circle inside a non-empty binary mask (its deepest point)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(x), float(y), float(depth[y, x])


def candidate_frames(
    prob: np.ndarray, reference: np.ndarray, scales: tuple[float, ...] = (1.0,), threshold: float = 0.5
) -> list[Frame]:
    """Guesses at a structure's frame from a (H, W) probability map, given its (RH, RW) reference mask.

    A classifier's region can leak into neighbouring tissue (a fetal head's region into the body) or miss a
    structure's rim; each guess fails differently, and the caller keeps the one whose segmentation looks best.
    Per scale: the region's frame (``probability_frame``); its deepest point at the region's size; its deepest
    point at the reference's size times the ratio of the inscribed circles' radii (blind to a leak through a neck).
    Sizes are multiplied by the scale. The first guess is ``probability_frame``; [] when nothing reaches
    ``threshold`` or the reference mask is empty.
    """
    region = probable_region(prob, threshold)
    if region is None or not reference.any():
        return []
    frame = probability_frame(prob, threshold)
    x, y, radius = inscribed_circle(region)
    ref_radius = inscribed_circle(reference)[2]
    by_depth = float(np.sqrt(reference.sum())) * radius / ref_radius
    frames = []
    for s in scales:
        frames += [Frame(frame.x, frame.y, frame.size * s), Frame(x, y, frame.size * s), Frame(x, y, by_depth * s)]
    return frames


def combine_frames(frames: list[Frame]) -> Frame:
    """One frame for several structures: area-weighted centre, size from the total area."""
    areas = np.array([f.size**2 for f in frames])
    x = float((areas * [f.x for f in frames]).sum() / areas.sum())
    y = float((areas * [f.y for f in frames]).sum() / areas.sum())
    return Frame(x, y, float(np.sqrt(areas.sum())))


def solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area of a binary mask's largest connected component (0 when empty)."""
    largest = probable_region(np.asarray(mask, np.float32))
    if largest is None:
        return 0.0
    return float(largest.sum() / convex_hull_image(largest).sum())


def gradient_magnitude(image: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Gaussian gradient magnitude of a (H, W[, C]) image (channels averaged), relative to its mean over the image."""
    grey = np.asarray(image, np.float32)
    grey = grey.mean(-1) if grey.ndim == 3 else grey
    gradient = ndimage.gaussian_gradient_magnitude(grey, sigma)
    return gradient / max(float(gradient.mean()), 1e-6)


def boundary_strength(gradient: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``gradient`` (``gradient_magnitude``) on the pixels just outside a binary mask (0 when empty): how
    much the mask's outline follows edges of the image."""
    outline = ndimage.binary_dilation(mask) & ~mask
    return float(gradient[outline].mean()) if outline.any() else 0.0


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
