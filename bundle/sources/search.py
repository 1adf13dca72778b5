"""Candidate search as a source: SAM on a grid of boxes of several sizes over the whole image, each class served by
the candidate mask that looks most like the reference's structure and least like its surroundings.

It assumes neither the reference's position nor its size (the size is a weak prior only), so a lesion much larger or
smaller than the reference's, or elsewhere in the image, is still among the candidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bundle.candidates import appearance, box_grid, box_regions, candidate_scores, regions
from bundle.classifier import REFERENCE_VIEWS, reference_views
from bundle.decoder import SamDecoder
from bundle.prediction import Prediction
from bundle.prompts import Prompts, mask_to_box
from bundle.sources.base import Cohort, Source, register
from bundle.store import EmbeddingStore, Reference
from bundle.transforms import one_hot

__all__ = ["SearchSource", "SearchState", "Candidates"]


@dataclass
class SearchState:
    """Per view of the reference (V: itself and its scaled / rotated copies), class (C) and feature channel (D): the
    mean matching feature inside (V, C, D) and outside (V, C, D) the class; the reference's area share per class (C,)
    and its number of separate parts."""

    inside: torch.Tensor
    outside: torch.Tensor
    area: torch.Tensor
    parts: list[int]


@dataclass
class Candidates:
    """N candidate masks of one image: low-res logits (N, L, L) over the image's part of SAM's frame, SAM's predicted
    IoU (N,), area share (N,), mean matching feature (N, D) inside and in a band around each (N, D), and prompt box
    (N, 4) in image pixels."""

    low_res: torch.Tensor
    iou: np.ndarray
    area: np.ndarray
    pooled: np.ndarray
    ring: np.ndarray
    boxes: np.ndarray


def _pooled(masks: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Mean (N, D) of (D, h, w) features under (N, H', W') soft masks (resampled to the feature grid by area)."""
    weights = F.interpolate(masks[:, None].float(), size=tuple(feats.shape[1:]), mode="area")[:, 0].flatten(1)
    return weights @ feats.flatten(1).T / weights.sum(1, keepdim=True).clamp(min=1e-6)


def _rings(masks: torch.Tensor, grid: tuple[int, int], width: float = 0.25) -> torch.Tensor:
    """(N, h, w) bands just outside (N, H', W') boolean masks on an (h, w) feature grid, ``width`` times each mask's
    equivalent radius wide (at least one cell)."""
    cover = F.interpolate(masks[:, None].float(), size=grid, mode="area")[:, 0]
    steps = (width * (cover.flatten(1).sum(1) / np.pi).sqrt()).round().clamp(min=1).long()
    inside = cover > 0.5
    rings = torch.zeros_like(cover)
    for k in steps.unique().tolist():
        rows = steps == k
        grown = F.max_pool2d(inside[rows][:, None].float(), 2 * k + 1, stride=1, padding=k)[:, 0]
        rings[rows] = grown * (~inside[rows]).float()
    return rings


@register("search")
class SearchSource(Source):
    """The best-scoring of SAM's masks for a grid of boxes (``bundle.candidates.box_grid``), per class.

    Args:
        decoder: the SAM decoder (its backend decodes the candidates).
        sides: box sides as shares of the image's height and width.
        overlap: boxes of one side per image axis, about ``overlap / side``.
        iou_weight: weight of SAM's predicted IoU in a candidate's score.
        size_weight: weight of the prior on the log ratio of a candidate's area to the reference's.
        ring_weight: weight of how much the band around a candidate looks like the structure (a part of a larger
            structure is surrounded by more of it), subtracted.
        min_area: candidates smaller than this share of the image are not considered.
        max_area: nor candidates larger than this share.
        min_appearance: a class whose best candidate's ``appearance`` against the reference itself is not above this is
            reported not found.
        views: the reference's scaled and rotated views (``bundle.classifier.reference_views``) describe each class
            too, each candidate compared with the view it resembles most (False: the reference alone).
        prescreen: per class, only this many boxes are decoded: those whose inscribed ellipse's features look most
            like the class (None: every box; each decode costs about 0.15 s on a 2-core CPU with LiteMedSAM).
        region_boxes: boxes around the regions whose cells look like each class are candidates too.
        chunk: boxes decoded per batch (the masks do not depend on it; 64 at once doubled the peak memory).
    """

    kind = "search"

    def __init__(
        self,
        decoder: SamDecoder,
        sides: tuple[float, ...] = (0.15, 0.25, 0.4, 0.6, 0.85, 1.0),
        overlap: float = 1.5,
        iou_weight: float = 0.25,
        size_weight: float = 0.05,
        ring_weight: float = 0.5,
        min_area: float = 0.0005,
        max_area: float = 0.9,
        min_appearance: float = 0.0,
        views: bool = True,
        prescreen: int | None = 64,
        region_boxes: bool = True,
        chunk: int = 16,
    ):
        self.decoder, self.sides, self.overlap = decoder, tuple(float(s) for s in sides), float(overlap)
        self.iou_weight, self.size_weight, self.ring_weight = float(iou_weight), float(size_weight), float(ring_weight)
        self.min_area, self.max_area, self.chunk = float(min_area), float(max_area), int(chunk)
        self.min_appearance, self.views = float(min_appearance), bool(views)
        self.prescreen = None if prescreen is None else int(prescreen)
        self.region_boxes = bool(region_boxes)

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> SearchState:
        start = time.time()
        images = [(reference.image, reference.label), *reference_views(reference.image, reference.label)]
        inside, outside = [], []
        for view, (img, lab) in enumerate(images[: 1 + len(REFERENCE_VIEWS) if self.views else 1]):
            feats = cohort.store.reference_features(reference, view, img).float().cpu()
            onehot = one_hot(torch.from_numpy(lab), reference.num_classes)[1:].float()  # (C, H, W)
            present = onehot.flatten(1).sum(1, keepdim=True) > 0  # a view may have cut a class off: NaN rows
            inside.append(torch.where(present, _pooled(onehot, feats), torch.nan))
            outside.append(torch.where(present, _pooled(1.0 - onehot, feats), torch.nan))
        area = reference.onehot[1:].float().flatten(1).mean(1)
        cohort.store.clock.add("search_s", start)
        return SearchState(torch.stack(inside), torch.stack(outside), area, list(reference.parts))

    @torch.no_grad()
    def candidates(self, state: SearchState, key: str, image: np.ndarray, store: EmbeddingStore) -> Candidates:
        """SAM's mask for every box of the grid over ``image`` (or the ``prescreen`` boxes whose content looks most
        like some class), with what scoring them needs."""
        sam, embedding = self.decoder.sam, store.embedding(key, image)
        feats = store.features(key, image).float().cpu()
        L = sam.low_res_size
        lh = max(1, int(round(embedding.input_size[0] * L / sam.img_size)))
        lw = max(1, int(round(embedding.input_size[1] * L / sam.img_size)))
        boxes = box_grid(embedding.original_size, self.sides, self.overlap)
        if self.prescreen and len(boxes) > self.prescreen:
            regions = torch.from_numpy(box_regions(boxes, embedding.original_size, tuple(feats.shape[1:])))
            content = _pooled(regions, feats).numpy()
            keep = set()
            for c in range(len(state.parts)):
                keep.update(np.argsort(-appearance(content, *self._views(state, c)))[: self.prescreen].tolist())
            boxes = boxes[sorted(keep)]
        if self.region_boxes:
            boxes = np.concatenate([boxes, self._region_boxes(state, feats, embedding.original_size)])
        lows, ious = [], []
        for i in range(0, len(boxes), self.chunk):
            sparse, dense = sam.encode_prompts(embedding, boxes=torch.from_numpy(boxes[i : i + self.chunk]))
            low, iou = sam.decode_low_res(embedding, sparse, dense, multimask=False)
            lows.append(low[:, 0, :lh, :lw].float().cpu())
            ious.append(iou[:, 0].float().cpu())
        low_res = torch.cat(lows)
        masks = low_res > 0
        return Candidates(
            low_res,
            torch.cat(ious).numpy(),
            masks.flatten(1).float().mean(1).numpy(),
            _pooled(masks, feats).numpy(),
            _pooled(_rings(masks, tuple(feats.shape[1:])), feats).numpy(),
            boxes,
        )

    def _region_boxes(self, state: SearchState, feats: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """(M, 4) boxes, one cell wider on each side, around the connected regions of each class's per-cell
        ``appearance`` map (D, h, w) ``feats`` above 0 and 0.1 (at most 3 per threshold, by mass)."""
        D, h, w = feats.shape
        cells = feats.reshape(D, -1).T.numpy()
        (H, W), out = size, []
        for c in range(len(state.parts)):
            looks = appearance(cells, *self._views(state, c)).reshape(h, w)
            for region in regions(looks, thresholds=(0.0, 0.1)):
                x0, y0, x1, y1 = mask_to_box(region)
                out.append([(x0 - 1) * W / w, (y0 - 1) * H / h, (x1 + 2) * W / w, (y1 + 2) * H / h])
        boxes = np.asarray(out, np.float32).reshape(-1, 4)
        return np.clip(boxes, 0, [W - 1, H - 1, W - 1, H - 1]).astype(np.float32)

    @staticmethod
    def _views(state: SearchState, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Class ``c``'s (V', D) mean features inside and outside it in the views that show it."""
        inside, outside = state.inside[:, c].numpy(), state.outside[:, c].numpy()
        shown = np.isfinite(inside).all(1)
        return inside[shown], outside[shown]

    def scores(self, state: SearchState, found: Candidates) -> np.ndarray:
        """(C, N) score of every candidate for every class; -inf for candidates outside the area limits."""
        rows = [
            candidate_scores(
                found.pooled,
                found.ring,
                found.iou,
                found.area,
                *self._views(state, c),
                float(state.area[c]),
                self.iou_weight,
                self.size_weight,
                self.ring_weight,
            )
            for c in range(len(state.parts))
        ]
        usable = (found.area >= self.min_area) & (found.area <= self.max_area)
        return np.where(usable[None], np.stack(rows), -np.inf)

    @staticmethod
    def chosen(scores: np.ndarray, masks: torch.Tensor, parts: int, max_overlap: float = 0.2) -> list[int]:
        """Indices of the best candidate and, for a class in several parts, of the next best that overlap no chosen
        one by more than ``max_overlap`` (IoU), up to ``parts`` in all; [] when none is usable."""
        picked: list[int] = []
        for i in np.argsort(-scores):
            if not np.isfinite(scores[i]) or len(picked) == parts:
                break
            m = masks[i]
            if all((m & masks[j]).sum() <= max_overlap * (m | masks[j]).sum() for j in picked):
                picked.append(int(i))
        return picked

    def rate(self, state: SearchState, masks: np.ndarray, iou: torch.Tensor, feats: torch.Tensor) -> np.ndarray:
        """(C,) score of one (H, W) boolean mask per class (``masks`` (C, H, W), e.g. another source's, with SAM's
        predicted IoU (C,)) by the candidates' scorer, on an image's matching features (D, h, w); -inf for an empty
        mask. The area limits are not applied: they keep the grid's boxes from proposing the whole image, whereas
        a mask rated here (a large lesion filling the view) is to be compared, not ruled out."""
        grid, out = tuple(feats.shape[1:]), np.full(len(state.parts), -np.inf)
        for c, mask in enumerate(masks):
            share = float(mask.mean())
            if share == 0:
                continue
            m = torch.from_numpy(np.ascontiguousarray(mask))[None]
            pooled, ring = _pooled(m, feats).numpy(), _pooled(_rings(m, grid), feats).numpy()
            inside, outside = self._views(state, c)
            out[c] = candidate_scores(
                pooled,
                ring,
                np.asarray([float(iou[c])]),
                np.asarray([share]),
                inside,
                outside,
                float(state.area[c]),
                self.iou_weight,
                self.size_weight,
                self.ring_weight,
            )[0]
        return out

    def predict(self, state: SearchState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        sam, embedding = self.decoder.sam, store.embedding(key, image)
        found = self.candidates(state, key, image, store)
        scores, masks = self.scores(state, found), found.low_res > 0
        C = len(state.parts)
        pred = Prediction.empty(C, embedding.original_size)
        boxes = np.zeros((C, 4), np.float32)
        L = sam.low_res_size
        for c in range(C):
            picked = self.chosen(scores[c], masks, int(state.parts[c]))
            if not picked:
                continue
            # on the reference itself: a view's padding can hold copies of the structure labelled background
            looks = appearance(found.pooled[picked[:1]], state.inside[0, c].numpy(), state.outside[0, c].numpy())[0]
            if looks <= self.min_appearance:
                continue
            low = torch.full((len(picked), L, L), -20.0)
            low[:, : masks.shape[1], : masks.shape[2]] = found.low_res[picked]
            pred.logits[c] = sam.upscale(low[:, None], embedding)[:, 0].amax(0).cpu()
            pred.iou[c] = float(found.iou[picked].mean())
            pred.found[c] = True
            boxes[c] = found.boxes[picked[0]]
        prompts = Prompts(torch.from_numpy(boxes), None, None, None, pred.found.clone())
        return Prediction(pred.logits, pred.iou, pred.found, prompts)

    def state_dict(self, state: SearchState) -> dict[str, Any]:
        return {
            "inside": state.inside.clone(),
            "outside": state.outside.clone(),
            "area": state.area.clone(),
            "parts": list(state.parts),
            "decoder": self.decoder.settings(),
            "settings": {
                "sides": list(self.sides),
                "overlap": self.overlap,
                "iou_weight": self.iou_weight,
                "size_weight": self.size_weight,
                "ring_weight": self.ring_weight,
                "min_area": self.min_area,
                "max_area": self.max_area,
                "min_appearance": self.min_appearance,
                "views": self.views,
                "prescreen": self.prescreen,
                "region_boxes": self.region_boxes,
            },
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["SearchSource", SearchState]:
        source = cls(SamDecoder.from_settings(store.sam, state["decoder"]), **state["settings"])
        return source, SearchState(state["inside"], state["outside"], state["area"], list(state["parts"]))
