"""The reference's class layout, kept in every prediction: how many separate parts each class has (both lungs as one
label: two) and which class surrounds which (the myocardium around the left-ventricle cavity).

Without it, keeping only a class's largest component drops a lung, and an outer class whose mask SAM filled into a
disc swallows the class it surrounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Transform
from scipy import ndimage

__all__ = [
    "FillBackgroundHoles",
    "Layout",
    "components",
    "enclosing_share",
    "keep_parts",
    "on_other_classes",
    "part_counts",
]

_EIGHT = np.ones((3, 3), bool)


def components(mask: np.ndarray, min_share: float) -> list[np.ndarray]:
    """Connected components (8-connected) of a boolean (H, W) mask with at least ``min_share`` of the largest one's
    area, largest first."""
    lab, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return []
    areas = np.bincount(lab.ravel())[1:]
    order = np.argsort(-areas, kind="stable")
    return [lab == i + 1 for i in order if areas[i] >= min_share * areas[order[0]]]


def part_counts(label: np.ndarray, num_classes: int, min_share: float = 0.1) -> list[int]:
    """Per class 1..C of a (H, W) class-index label, its separate parts (``components``), at least 1."""
    return [max(len(components(label == c + 1, min_share)), 1) for c in range(num_classes)]


def keep_parts(label: np.ndarray, parts: list[int], min_share: float) -> np.ndarray:
    """(H, W) class indices with, per class c (1..C), only its ``parts[c - 1]`` largest components that reach
    ``min_share`` of its largest; the rest becomes background."""
    out = np.zeros_like(label)
    for c, k in enumerate(parts, start=1):
        for part in components(label == c, min_share)[: max(int(k), 1)]:
            out[part] = c
    return out


def enclosing_share(label: np.ndarray, c: int, num_classes: int, bins: int = 16) -> np.ndarray:
    """Per class (0-based), the share of directions around class ``c``'s centroid in which it makes up most of the
    2-pixel rim just outside ``c``: (num_classes,); near 1 for a class that surrounds ``c``, zeros when ``c`` is
    absent."""
    inner = label == c
    out = np.zeros(num_classes)
    if not inner.any():
        return out
    rim = ndimage.binary_dilation(inner, structure=_EIGHT, iterations=2) & ~inner
    ys, xs = np.nonzero(rim)
    cy, cx = np.argwhere(inner).mean(0)
    sector = ((np.arctan2(ys - cy, xs - cx) + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    values = label[ys, xs]
    used = 0
    for s in range(bins):
        v = values[sector == s]
        if v.size == 0:
            continue
        used += 1
        top = np.bincount(v, minlength=num_classes + 1)
        if top.argmax() > 0 and top.max() * 2 > v.size:
            out[top.argmax() - 1] += 1
    return out / max(used, 1)


def on_other_classes(candidates: np.ndarray, kept: np.ndarray, limit: float = 0.5) -> np.ndarray:
    """(C,) where more than ``limit`` of class c's candidate mask (``candidates`` (C, H, W) boolean) lies on the
    ``kept`` (C, H, W) boolean masks of the other classes."""
    out = np.zeros(len(candidates), dtype=bool)
    for c, mask in enumerate(candidates):
        area = mask.sum()
        others = np.delete(kept, c, axis=0).any(axis=0) if len(kept) > 1 else np.zeros_like(mask)
        out[c] = area > 0 and (mask & others).sum() > limit * area
    return out


@dataclass
class Layout:
    """Per class (0-based): ``parts``, its separate parts in the reference; ``surrounds``, the classes it encloses.

    Class ``a`` is enclosed by ``b`` when ``b`` makes up most of the rim just outside ``a`` in at least ``enclosure``
    of the directions around it (``enclosing_share``).
    """

    parts: list[int]
    surrounds: list[list[int]]
    min_share: float = 0.1

    @classmethod
    def of(cls, label: np.ndarray, num_classes: int, min_share: float = 0.1, enclosure: float = 0.6) -> "Layout":
        """The layout of a (H, W) class-index reference label (0 = background, 1..C)."""
        parts = part_counts(label, num_classes, min_share)
        surrounds: list[list[int]] = [[] for _ in range(num_classes)]
        for a in range(num_classes):
            share = enclosing_share(label, a + 1, num_classes)
            b = int(share.argmax())
            if b != a and share[b] >= enclosure:
                surrounds[b].append(a)
        return cls(parts, surrounds, min_share)

    def nest(self, logits: torch.Tensor) -> torch.Tensor:
        """(C, H, W) logits where an enclosed class is found, its enclosing class is not: the inner class wins."""
        out = logits.clone()
        for b, inner in enumerate(self.surrounds):
            for a in inner:
                out[b] = torch.where(logits[a] > 0, torch.minimum(out[b], torch.full_like(out[b], -20.0)), out[b])
        return out


class FillBackgroundHoles(Transform):
    """(1, H, W) class indices with each background hole enclosed by one class filled with that class. Unlike MONAI's
    ``FillHoles``, a class enclosed by another (a cavity inside its wall) is never overwritten."""

    def __call__(self, label: torch.Tensor | np.ndarray) -> torch.Tensor:
        lab = np.asarray(label).copy()
        for c in np.unique(lab[0]):
            if c == 0:
                continue
            mask = lab[0] == c
            lab[0][ndimage.binary_fill_holes(mask, structure=_EIGHT) & (lab[0] == 0)] = c
        return torch.as_tensor(lab)
