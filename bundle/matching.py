"""Prompts from feature matching (SAT / AP-MedSAM, SPEC 2.2): reference patches -> target points, per class.

Feature space: reference patches inside the class mask are matched to their nearest target patch (forward), and a
match is kept only when that target patch's nearest reference patch is also inside (backward, cycle check):
positives. The same for background patches gives negatives; target patches least similar to any foreground
reference patch and not matched back into the foreground are hard negatives. Physical space: negatives near a
positive are dropped (exclusive sampling) and each point set is thinned to one representative per radius
(sparse sampling). Every step accepts empty sets and returns empty sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bundle.prompts import Prompts

__all__ = [
    "Matches",
    "patch_labels",
    "match_patches",
    "exclusive_sampling",
    "sparse_sampling",
    "grid_to_pixels",
    "match_prompts",
]


@dataclass
class Matches:
    """Target patch indices (flat, row-major in the target grid)."""

    positives: torch.Tensor
    negatives: torch.Tensor
    hard_negatives: torch.Tensor


def patch_labels(mask: torch.Tensor, grid: tuple[int, int], inside: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground / background reference patches of a (H, W) mask on a (h, w) patch grid, flattened.

    A patch is foreground when at least ``inside`` of it lies in the mask, background when none of it does; patches
    on the boundary are neither.
    """
    frac = F.interpolate(mask[None, None].float(), size=grid, mode="area")[0, 0].reshape(-1)
    return frac >= inside, frac <= 0.0


def match_patches(
    ref_feats: torch.Tensor,
    tgt_feats: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    num_hard: int = 4,
) -> Matches:
    """Forward + backward nearest-neighbour matching of L2-normalised patch features.

    Args:
        ref_feats: (Nr, D) reference patch features; ``fg`` and ``bg`` (Nr,) mark foreground / background patches.
        tgt_feats: (Nt, D) target patch features.
        num_hard: hard negatives to return (fewer when fewer qualify).
    """
    empty = torch.zeros(0, dtype=torch.long)
    if ref_feats.shape[0] == 0 or tgt_feats.shape[0] == 0:
        return Matches(empty, empty, empty)
    sim = ref_feats @ tgt_feats.T  # (Nr, Nt)
    forward = sim.argmax(1)  # reference patch -> target patch
    backward = sim.argmax(0)  # target patch -> reference patch

    def cycle(source: torch.Tensor) -> torch.Tensor:
        if not source.any():
            return empty
        hits = torch.unique(forward[source])
        return hits[source[backward[hits]]]

    positives, negatives = cycle(fg), cycle(bg)
    hard = empty
    if fg.any() and num_hard > 0:
        closeness = sim[fg].max(0).values  # similarity of each target patch to its closest foreground patch
        allowed = ~fg[backward]
        allowed[positives] = False
        order = torch.argsort(closeness)
        hard = order[allowed[order]][:num_hard]
    return Matches(positives, negatives, hard)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


def exclusive_sampling(positives: np.ndarray, negatives: np.ndarray, radius: float) -> np.ndarray:
    """Negatives (M, 2) farther than ``radius`` from every positive (N, 2)."""
    if len(negatives) == 0 or len(positives) == 0:
        return negatives
    return negatives[_distances(negatives, positives).min(1) > radius]


def sparse_sampling(points: np.ndarray, others: np.ndarray, radius: float, limit: int | None = None) -> np.ndarray:
    """One representative per group of ``points`` within ``radius``: the one farthest from ``others``.

    Greedy: take the point farthest from ``others`` (any point when ``others`` is empty), drop every point within
    ``radius`` of it, repeat. At most ``limit`` points, in the order picked.
    """
    if len(points) == 0:
        return points
    far = _distances(points, others).min(1) if len(others) else np.zeros(len(points))
    left = np.ones(len(points), dtype=bool)
    picked: list[int] = []
    while left.any() and (limit is None or len(picked) < limit):
        i = int(np.flatnonzero(left)[np.argmax(far[left])])
        picked.append(i)
        left &= np.linalg.norm(points - points[i], axis=1) > radius
    return points[picked]


def grid_to_pixels(index: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Flat patch indices on a (h, w) grid covering a (H, W) image -> (N, 2) patch-centre (x, y) pixels."""
    idx = index.cpu().numpy()
    h, w = grid
    x = (idx % w + 0.5) * size[1] / w
    y = (idx // w + 0.5) * size[0] / h
    return np.stack([x, y], axis=1).astype(np.float32) if len(idx) else np.zeros((0, 2), np.float32)


def _box(points: np.ndarray, pad: float) -> np.ndarray:
    lo, hi = points.min(0) - pad, points.max(0) + pad
    return np.array([lo[0], lo[1], hi[0], hi[1]], dtype=np.float32)


def match_prompts(
    ref_feats: torch.Tensor,
    ref_masks: torch.Tensor,
    tgt_feats: torch.Tensor,
    size: tuple[int, int],
    num_points: int = 8,
    radius: float = 0.125,
) -> Prompts:
    """Point prompts (and the box of the positives) per class for one target.

    Args:
        ref_feats, tgt_feats: (D, h, w) L2-normalised patch features of the reference and the target.
        ref_masks: (C, H, W) reference masks, one per class.
        size: the target's (H, W).
        num_points: at most this many positive and as many negative points per class.
        radius: exclusive / sparse sampling radius as a fraction of the target's long side.
    Returns:
        prompts with ``valid`` False for classes without a positive match (no prompt is invented for them).
    """
    D = ref_feats.shape[0]
    ref_flat, tgt_flat = ref_feats.reshape(D, -1).T, tgt_feats.reshape(D, -1).T
    grid = tuple(tgt_feats.shape[1:])
    r = radius * max(size)
    pad = 0.5 * max(size[0] / grid[0], size[1] / grid[1])
    C = ref_masks.shape[0]
    pts = np.zeros((C, 2 * num_points, 2), np.float32)
    labels = -np.ones((C, 2 * num_points), np.int64)
    boxes = np.zeros((C, 4), np.float32)
    valid = torch.zeros(C, dtype=torch.bool)
    for c in range(C):
        fg, bg = patch_labels(ref_masks[c], tuple(ref_feats.shape[1:]))
        found = match_patches(ref_flat, tgt_flat, fg, bg)
        pos = grid_to_pixels(found.positives, grid, size)
        if len(pos) == 0:
            continue
        neg = grid_to_pixels(torch.cat([found.negatives, found.hard_negatives]), grid, size)
        neg = exclusive_sampling(pos, neg, r)
        p = sparse_sampling(pos, neg, r, num_points)
        n = sparse_sampling(neg, pos, r, num_points)
        pts[c, : len(p)], labels[c, : len(p)] = p, 1
        pts[c, num_points : num_points + len(n)], labels[c, num_points : num_points + len(n)] = n, 0
        boxes[c] = _box(pos, pad)
        valid[c] = True
    return Prompts(torch.from_numpy(boxes), torch.from_numpy(pts), torch.from_numpy(labels), None, valid)
