"""Aligned warping: the classifier says where a structure is and how large, each image is pre-aligned to the
reference accordingly, and a warping network trained on the aligned cohort outlines it there.

For structures that move and change size (fetal heads, lesions), where plain warping loses them. Of several
guesses at the frame (``candidate_frames``), each image keeps the one whose SAM mask scores best (``aligned_score``);
guesses much smaller or larger than the located region (``wide_scales``: the locator finds only the core of a large
lesion, or a head with the body around it) replace it only where they score clearly better (``wide_margin``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from bundle.alignment import (
    Frame,
    boundary_strength,
    candidate_frames,
    combine_frames,
    from_reference,
    gradient_magnitude,
    label_frame,
    probable_region,
    solidity,
    to_reference,
)
from bundle.classifier import PatchClassifier
from bundle.decoder import SamDecoder
from bundle.engine import WarpTrainer
from bundle.prediction import Prediction
from bundle.sources.base import Cohort, Source, load_source, register, save_source
from bundle.sources.classifier import ClassifierSource
from bundle.sources.warp import WarpSource, WarpState
from bundle.store import EmbeddingStore, Reference
from bundle.transforms import from_working, normalize_intensity, to_working

__all__ = ["AlignedSource", "AlignedState", "aligned_frames", "aligned_score", "best_candidate"]


@dataclass
class AlignedState:
    """The aligned warping network, the fitted locator and the classes (C,) bool it outlines."""

    warp: WarpState | None  # None: the locator found none of the classes in the cohort
    locator: PatchClassifier
    classes: torch.Tensor
    reference_label: np.ndarray  # (H, W) class indices


def aligned_frames(
    ref_label: np.ndarray, classes: torch.Tensor, probs: torch.Tensor, scales: tuple[float, ...]
) -> list[tuple[Frame, Frame]]:
    """Candidate (image frame, reference frame) pairs for ``classes`` (C,) from (C + 1, H, W) class probabilities
    (``candidate_frames`` per class, combined over the classes found in both; [] for none). The first candidate
    is the region's own frame."""
    index = (torch.nonzero(classes)[:, 0] + 1).tolist()
    reference = [label_frame(ref_label == c) for c in index]
    frames = [candidate_frames(probs[c].numpy(), ref_label == c, scales) for c in index]
    keep = [i for i, (f, r) in enumerate(zip(frames, reference)) if f and r is not None]
    if not keep:
        return []
    ref = combine_frames([reference[i] for i in keep])
    return [(combine_frames(list(guess)), ref) for guess in zip(*[frames[i] for i in keep])]


def aligned_score(prediction: Prediction, classes: torch.Tensor, gradient: np.ndarray | None = None) -> float:
    """How good an aligned prediction looks over ``classes`` (C,), averaged: SAM's predicted IoU times the solidity
    of the mask's largest component (a mask that leaked into the tissue next to a structure is less convex), times,
    given the image's ``gradient_magnitude``, the square root of how strongly its outline follows image edges."""
    masks = prediction.masks()
    scores = []
    for c in torch.nonzero(classes & prediction.found)[:, 0].tolist():
        region = probable_region(masks[c].astype(np.float32))
        if region is None:
            scores.append(0.0)
            continue
        region = ndimage.binary_fill_holes(region)
        score = float(prediction.iou[c]) * solidity(region)
        scores.append(score if gradient is None else score * np.sqrt(boundary_strength(gradient, region)))
    return float(np.mean(scores)) if scores else 0.0


def best_candidate(scores: list[float], narrow: int, margin: float) -> int:
    """Index of the candidate to keep: the best-scoring of the first ``narrow``, unless the best of the rest scores
    more than ``margin`` higher (ties: the first)."""
    first = int(np.argmax(scores[:narrow]))
    if narrow >= len(scores):
        return first
    wide = narrow + int(np.argmax(scores[narrow:]))
    return wide if scores[wide] > scores[first] + margin else first


@register("aligned")
class AlignedSource(Source):
    """Warping on images pre-aligned by where the ``locator`` finds the structure; the locator's own prediction
    where it finds none of the classes.

    Args:
        locator: the patch classifier source.
        trainer: test-time trainer of the aligned warping network (None for a predicting source).
        decoder: SAM prompt-to-mask step.
        working_size: long side of the warping network's frame.
        scales: size factors of the candidate frames.
        wide_scales: further size factors, whose best candidate replaces the best of ``scales`` only where it scores
            more than ``wide_margin`` higher (each guess costs a SAM decode).
    """

    kind = "aligned"

    def __init__(
        self,
        locator: ClassifierSource,
        trainer: WarpTrainer | None,
        decoder: SamDecoder,
        working_size: int = 128,
        scales: tuple[float, ...] = (1.0, 1.15),
        wide_scales: tuple[float, ...] = (),
        wide_margin: float = 0.0,
    ):
        self.locator, self.decoder, self.scales = locator, decoder, tuple(float(s) for s in scales)
        self.wide_scales, self.wide_margin = tuple(float(s) for s in wide_scales), float(wide_margin)
        self.warper = WarpSource(trainer, decoder, working_size)

    def _aligned_image(self, image: np.ndarray, frame: Frame, reference: Frame, shape: tuple[int, int]) -> torch.Tensor:
        """An image resampled into the reference's frame, in the working frame (1, S, S)."""
        aligned = to_reference(normalize_intensity(image), frame, reference, shape)
        return to_working(torch.from_numpy(aligned)[None], self.warper.working_size)

    def _candidates(
        self,
        locator: PatchClassifier,
        ref_label: np.ndarray,
        classes: torch.Tensor,
        key: str,
        image: np.ndarray,
        store: EmbeddingStore,
    ) -> tuple[list[tuple[Frame, Frame]], list[tuple[Frame, Frame]]]:
        """Candidate frames of one image from the fitted ``locator``'s probabilities: those of ``scales`` (the first
        is the region's own frame; [] where no class is found) and those of ``wide_scales``."""
        probs = PatchClassifier.upsample(self.locator.grid(locator, key, image, store), image.shape[:2])
        return (
            aligned_frames(ref_label, classes, probs, self.scales),
            aligned_frames(ref_label, classes, probs, self.wide_scales),
        )

    def fit(
        self,
        reference: Reference,
        cohort: Cohort,
        classes: torch.Tensor | None = None,
        locator: PatchClassifier | None = None,
    ) -> AlignedState:
        """``locator``: the classifier state already fitted on this reference and cohort (fitted here when None)."""
        trainer = self.warper.trainer
        if trainer is None:
            raise RuntimeError("this aligned source was loaded from a fitted model and has no trainer to fit with")
        classes = torch.ones(reference.num_classes, dtype=torch.bool) if classes is None else classes
        locator = self.locator.fit(reference, cohort) if locator is None else locator
        shape = tuple(reference.label.shape)

        def aligned(key: str, img: np.ndarray) -> torch.Tensor | None:
            narrow = self._candidates(locator, reference.label, classes, key, img, cohort.store)[0]
            return self._aligned_image(img, *narrow[0], shape) if narrow else None

        fixed = [x for x in cohort.map(aligned, "aligning") if x is not None]
        if not fixed:  # the classifier found none of the classes anywhere: its own boxes serve
            return AlignedState(None, locator, classes, reference.label)
        moving, moving_label = self.warper.reference_frame(reference)
        trainer.setup(moving, moving_label, torch.stack(fixed), f"{reference.tag}_aligned")
        if trainer.resume() is None:
            start = time.time()
            trainer.fit()
            cohort.store.clock.add("aligned_warp_training_s", start)
        warp = self.warper.trained_state(moving, moving_label, parts=reference.parts)
        return AlignedState(warp, locator, classes, reference.label)

    def predict(self, state: AlignedState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        narrow, wide = (
            ([], [])
            if state.warp is None
            else self._candidates(state.locator, state.reference_label, state.classes, key, image, store)
        )
        if not narrow:
            return self.locator.predict(state.locator, key, image, store)
        shape = tuple(state.reference_label.shape)
        fixed = torch.stack([self._aligned_image(image, *pair, shape) for pair in narrow + wide])
        softs = state.warp.warp(state.warp.moving_label, state.warp.fields(fixed)).cpu()
        embedding = store.embedding(key, image)
        gradient = gradient_magnitude(image)
        best: list[tuple[Prediction | None, float]] = [(None, -np.inf), (None, -np.inf)]  # of the narrow, the wide
        for i, (soft, (frame, ref)) in enumerate(zip(softs, narrow + wide)):
            probs = from_reference(from_working(soft, shape)[1:], frame, ref, embedding.original_size)
            pred = self.decoder.segment(embedding, probs.clamp(0, 1), parts=state.warp.parts)
            score = aligned_score(pred, state.classes, gradient)
            group = int(i >= len(narrow))
            if score > best[group][1]:  # only the two best are kept: full-size logits of every guess add up
                best[group] = (pred, score)
        kept = [b for b in best if b[0] is not None]
        return kept[best_candidate([score for _, score in kept], 1, self.wide_margin)][0]

    def state_dict(self, state: AlignedState) -> dict[str, Any]:
        return {
            "warp": None if state.warp is None else self.warper.state_dict(state.warp),
            "locator": save_source(self.locator, state.locator),
            "classes": state.classes.clone(),
            "scales": list(self.scales),
            "wide_scales": list(self.wide_scales),
            "wide_margin": self.wide_margin,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["AlignedSource", AlignedState]:
        locator, locator_state = load_source(state["locator"], reference, store, device)
        warp_state, decoder, size = None, locator.decoder, 128
        if state["warp"] is not None:
            warper, warp_state = WarpSource.from_state(state["warp"], reference, store, device)
            decoder, size = warper.decoder, warper.working_size
        wide = tuple(state.get("wide_scales", ())), float(state.get("wide_margin", 0.0))  # models saved before 0.20
        source = cls(locator, None, decoder, size, tuple(state["scales"]), *wide)
        return source, AlignedState(warp_state, locator_state, state["classes"].bool(), reference.label)
