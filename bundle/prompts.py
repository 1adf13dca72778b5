"""Prompts for SAM from a (warped) soft mask per class: mask, box and similarity-ranked points (SPEC 2.1.3-5).

Everything here is per image; masks are (C, H, W) in the image frame, points are (x, y) pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from bundle.features import sam_patch_features
from bundle.sam import Embedding, SamBackend

__all__ = [
    "Prompts",
    "PromptGenerator",
    "mask_to_box",
    "masks_to_boxes",
    "class_prototypes",
    "similarity_map",
    "select_points",
    "persam_prompts",
]


@dataclass
class Prompts:
    """A batch of prompt sets, one row per class; ``valid`` marks classes that have a prompt at all."""

    boxes: torch.Tensor | None
    points: torch.Tensor | None
    point_labels: torch.Tensor | None
    mask_logits: torch.Tensor | None
    valid: torch.Tensor  # (C,) bool

    def rows(self, keep: torch.Tensor) -> dict:
        """Keyword arguments for ``SamBackend.predict`` restricted to the rows in ``keep``."""
        pick = lambda t: None if t is None else t[keep]  # noqa: E731
        return {
            "boxes": pick(self.boxes),
            "points": pick(self.points),
            "point_labels": pick(self.point_labels),
            "mask_logits": pick(self.mask_logits),
        }

    @staticmethod
    def choose(pick: torch.Tensor, a: Prompts | None, b: Prompts | None) -> Prompts | None:
        """Rows of ``a`` where ``pick`` (C,) is True, rows of ``b`` elsewhere (for pictures of the fused strategy).

        A prompt kind is kept only when both sides have it in the same shape."""
        if a is None or b is None:
            return None

        def merge(x, y):
            if x is None or y is None or x.shape[1:] != y.shape[1:]:
                return None
            return torch.where(pick.view(-1, *([1] * (x.dim() - 1))), x, y)

        return Prompts(
            merge(a.boxes, b.boxes),
            merge(a.points, b.points),
            merge(a.point_labels, b.point_labels),
            merge(a.mask_logits, b.mask_logits),
            torch.where(pick, a.valid, b.valid),
        )


def mask_to_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight (x0, y0, x1, y1) box of a boolean (H, W) mask, None when empty."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.nonzero(rows)[0][[0, -1]]
    x0, x1 = np.nonzero(cols)[0][[0, -1]]
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def masks_to_boxes(masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (C, 4) of boolean (C, H, W) masks and which masks are non-empty (C,); empty masks get a zero box."""
    boxes = [mask_to_box(m) for m in masks]
    valid = torch.tensor([b is not None for b in boxes], dtype=torch.bool)
    return torch.from_numpy(np.stack([b if b is not None else np.zeros(4, np.float32) for b in boxes])), valid


def class_prototypes(embedding: Embedding, masks: torch.Tensor, img_size: int) -> torch.Tensor:
    """Mean L2-normalised encoder feature inside each (C, H, W) mask: (C, D). Zero rows for empty masks."""
    f = sam_patch_features(embedding, img_size)
    m = F.interpolate(masks[:, None].float().to(f.device), size=f.shape[1:], mode="area")[:, 0]
    proto = torch.einsum("dhw,chw->cd", f, m) / m.sum((1, 2)).clamp_min(1e-6)[:, None]
    return F.normalize(proto, dim=1)


def similarity_map(embedding: Embedding, prototypes: torch.Tensor, img_size: int) -> torch.Tensor:
    """Cosine similarity of every pixel's encoder feature to each prototype, in the image frame: (C, H, W)."""
    f = sam_patch_features(embedding, img_size)
    sim = torch.einsum("dhw,cd->chw", f, prototypes.to(f))
    return F.interpolate(sim[None], size=embedding.original_size, mode="bilinear", align_corners=False)[0]


def select_points(region: np.ndarray, sim: np.ndarray, n: int, highest: bool) -> np.ndarray:
    """Split the region's pixels (raster order) into ``n`` equal runs and take the best-ranked pixel of each.

    Returns (k, 2) (x, y) points, k <= n (fewer when the region has fewer pixels, none when it is empty).
    """
    idx = np.flatnonzero(region)
    if idx.size == 0 or n <= 0:
        return np.zeros((0, 2), dtype=np.float32)
    values = sim.ravel()[idx]
    points = []
    for part, vals in zip(np.array_split(idx, min(n, idx.size)), np.array_split(values, min(n, idx.size))):
        best = part[np.argmax(vals) if highest else np.argmin(vals)]
        points.append((best % region.shape[1], best // region.shape[1]))
    return np.asarray(points, dtype=np.float32)


class PromptGenerator:
    """Builds SAM prompts per class from soft masks.

    Args:
        use_box: box of the mask.
        use_mask: the mask itself as SAM's dense prompt (logits +-``mask_logit``).
        num_points: positive and as many negative points per class (0: none; points hurt LiteMedSAM, SPEC 3).
        band: erosion / dilation radius as a fraction of the object's equivalent diameter.
        threshold: probability above which a pixel belongs to the mask.
    """

    def __init__(
        self,
        use_box: bool = True,
        use_mask: bool = True,
        num_points: int = 0,
        band: float = 0.1,
        threshold: float = 0.5,
        mask_logit: float = 8.0,
    ):
        if not (use_box or use_mask or num_points > 0):
            raise ValueError("PromptGenerator needs at least one of box, mask or points")
        self.use_box, self.use_mask, self.num_points = use_box, use_mask, num_points
        self.band, self.threshold, self.mask_logit = band, threshold, mask_logit

    def settings(self) -> dict:
        """Constructor arguments, for saving with a fitted model."""
        return {
            "use_box": self.use_box,
            "use_mask": self.use_mask,
            "num_points": self.num_points,
            "band": self.band,
            "threshold": self.threshold,
            "mask_logit": self.mask_logit,
        }

    def __call__(
        self,
        sam: SamBackend,
        embedding: Embedding,
        probs: torch.Tensor,
        prototypes: torch.Tensor | None = None,
    ) -> Prompts:
        """Prompts from (C, H, W) foreground probabilities."""
        masks = (probs > self.threshold).cpu().numpy()
        valid = torch.tensor([m.any() for m in masks])
        boxes = masks_to_boxes(masks)[0] if self.use_box else None
        mask_logits = None
        if self.use_mask:
            mask_logits = sam.mask_prompt(probs, embedding.original_size, self.mask_logit)
        points = labels = None
        if self.num_points > 0 and prototypes is not None:
            points, labels = self._points(masks, similarity_map(embedding, prototypes, sam.img_size).cpu().numpy())
        return Prompts(boxes, points, labels, mask_logits, valid)

    def _points(self, masks: np.ndarray, sims: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_points
        pts = np.zeros((len(masks), 2 * n, 2), np.float32)
        lab = -np.ones((len(masks), 2 * n), np.int64)
        for c, (mask, sim) in enumerate(zip(masks, sims)):
            if not mask.any():
                continue
            r = max(1, int(round(self.band * 2 * np.sqrt(mask.sum() / np.pi))))
            inner = ndimage.binary_erosion(mask, iterations=r)
            if not inner.any():
                inner = mask
            band = ndimage.binary_dilation(mask, iterations=r) & ~inner
            pos = select_points(inner, sim, n, highest=True)
            neg = select_points(band, sim, n, highest=False)
            pts[c, : len(pos)], lab[c, : len(pos)] = pos, 1
            pts[c, n : n + len(neg)], lab[c, n : n + len(neg)] = neg, 0
        return torch.from_numpy(pts), torch.from_numpy(lab)


def persam_prompts(sim: torch.Tensor, valid: torch.Tensor) -> Prompts:
    """PerSAM's prompts: per class the most (positive) and least (negative) prototype-similar pixel.

    Args:
        sim: (C, H, W) cosine similarity to each class prototype.
        valid: (C,) classes that have a prototype (a non-empty reference mask).
    """
    C, H, W = sim.shape
    flat = sim.reshape(C, -1)
    best, worst = flat.argmax(1), flat.argmin(1)
    xy = lambda i: torch.stack([i % W, i // W], dim=1).float()  # noqa: E731
    points = torch.stack([xy(best), xy(worst)], dim=1)
    labels = torch.tensor([[1, 0]]).repeat(C, 1)
    return Prompts(None, points, labels, None, valid.clone())
