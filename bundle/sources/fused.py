"""Per-class fusion: the warp where it found the structure, else a fallback that finds it wherever it is.

Per class, over the cohort: the median Dice between the warp's and the classifier's SAM masks (agreement), and the
median correlation of the warped reference with the image around the structure (``WarpSource.similarity``). High
agreement means the anatomy sits where the warp puts it (chest X-rays) and the warp's mask prompt gives SAM the
better outline; low agreement means the structure moves or changes size (lesions, fetal heads) and the warp lost
it, unless the warp's own similarity shows it found the structure and the classifier is the one that is wrong.
Where SAM itself is unsure of the chosen source's masks (median predicted IoU over the cohort below
``sam_confidence``: low-contrast, speckled images such as echocardiography), the warped label itself serves the class
when the locator supports it at least as much, or when the class is a wall around another in the reference (SAM
outlines filled regions, not rings). Last, per image, a class the warp serves takes the locator's own SAM mask
instead where the locator supports that one clearly more (``switch_margin``) and it does not lie mostly on another
class's mask (look-alike classes, e.g. the two lungs): the warp can lose a structure in single images of a cohort where
it otherwise finds it. (Switching away from the fallback too helped PH2 and Kvasir but lowered HC18 on the tuning
splits.)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from bundle.candidates import support
from bundle.classifier import PatchClassifier
from bundle.layout import Layout
from bundle.prediction import Prediction, combine, dice, own_places
from bundle.sources.aligned import AlignedSource
from bundle.sources.base import Cohort, Source, load_source, register, save_source
from bundle.sources.classifier import ClassifierSource
from bundle.sources.warp import WarpSource, registered
from bundle.store import EmbeddingStore, Reference

__all__ = ["Decision", "FusedSource", "FusedState"]

logger = logging.getLogger(__name__)


@dataclass
class Decision:
    """Which source serves one class (``primary``: the warp), and the cohort measurements behind the choice."""

    primary: bool
    source: str
    agreement: float
    warp_similarity: float | None = None
    sam_iou: float | None = None  # median SAM-predicted IoU of the chosen source's masks over the cohort
    registration: bool = False  # the warped label itself serves the class (SAM unsure)


@dataclass
class FusedState:
    decisions: list[Decision]  # per class, in class-index order
    primary: Any
    locator: PatchClassifier
    fallback: Any | None  # None when every class keeps the warp (or there is no fallback)

    @property
    def use_primary(self) -> torch.Tensor:
        return torch.tensor([d.primary for d in self.decisions])

    @property
    def use_registration(self) -> torch.Tensor:
        return torch.tensor([d.registration for d in self.decisions])


def _supports(probs: torch.Tensor, pred: Prediction) -> torch.Tensor:
    """``support`` of each class's mask of ``pred`` by (C + 1, H, W) class probabilities: (C,)."""
    masks = pred.masks()
    return torch.tensor([support(probs[c + 1].numpy(), masks[c]) for c in range(len(masks))])


@register("fused")
class FusedSource(Source):
    """Per class, the ``primary`` warp where it found the structure, else the ``fallback`` (or the locator's boxes).

    Args:
        primary: the warp source.
        locator: the patch classifier source the warp is checked against.
        fallback: where the warp lost a class (e.g. ``AlignedSource``); None: the locator's own prediction.
        agreement: a class keeps the warp when the median warp-vs-classifier Dice reaches this...
        warp_similarity: ... or when the median ``WarpSource.similarity`` reaches this (None: not used).
        sam_confidence: a class whose chosen source's masks have a median SAM-predicted IoU below this over the
            cohort (at most ``confidence_sample`` images) is served by the warped label itself (None: never).
        confidence_sample: images the fallback's predicted IoU is measured on.
        switch_margin: per image, a class the warp serves with SAM takes the locator's SAM mask instead where that
            one's ``support`` is higher by more than this (None: never).
        absent_margin / absent_support: in one image, a class whose SAM mask is predicted ``absent_margin`` below the
            class's median IoU and that the locator does not support (``support`` below ``absent_support``) is
            reported not found instead of returning a doubtful mask (None: never; off by default: on JSRT it dropped
            a correct lung).
    """

    kind = "fused"

    def __init__(
        self,
        primary: WarpSource,
        locator: ClassifierSource,
        fallback: AlignedSource | None = None,
        agreement: float = 0.73,
        warp_similarity: float | None = 0.7,
        sam_confidence: float | None = 0.8,
        confidence_sample: int = 16,
        switch_margin: float | None = 0.25,
        absent_margin: float | None = None,
        absent_support: float = 0.3,
    ):
        self.primary, self.locator, self.fallback = primary, locator, fallback
        self.agreement, self.warp_similarity = float(agreement), warp_similarity
        self.sam_confidence, self.confidence_sample = sam_confidence, int(confidence_sample)
        self.absent_margin, self.absent_support = absent_margin, float(absent_support)
        self.switch_margin = switch_margin

    def decide(self, agreement: torch.Tensor, similarity: torch.Tensor | None) -> list[Decision]:
        """Per class, the source to use, from the cohort's (N, C) Dice between the warp's and the locator's masks and
        (N, C) warp similarities."""
        other = (self.fallback or self.locator).kind
        decisions = []
        for c in range(agreement.shape[1]):
            agree = float(np.median(agreement[:, c].numpy()))
            found, sim = agree >= self.agreement, None
            if similarity is not None:
                sim = round(float(similarity[:, c].median()), 3)
                found |= self.warp_similarity is not None and sim >= self.warp_similarity
            decisions.append(Decision(found, self.primary.kind if found else other, round(agree, 3), sim))
        return decisions

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> FusedState:
        primary = self.primary.fit(reference, cohort)
        locator = self.locator.fit(reference, cohort)
        store = cohort.store

        def compare(key: str, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            """Per class, the Dice between the warp's and the locator's masks and the warp's similarity: (C,), (C,)."""
            warped = self.primary.predict(primary, key, image, store).masks()
            located = self.locator.predict(locator, key, image, store).masks()
            agreement = torch.tensor([dice(a, b) for a, b in zip(warped, located)], dtype=torch.float64)
            return agreement, self.primary.similarity(primary, image)

        agreement, similarity = (torch.stack(x) for x in zip(*cohort.map(compare, "warp and classifier")))
        decisions = self.decide(agreement, similarity)
        lost = torch.tensor([not d.primary for d in decisions])
        fallback = None
        if self.fallback is not None and lost.any():
            fallback = self.fallback.fit(reference, cohort, lost, locator=locator)
        state = FusedState(decisions, primary, locator, fallback)
        if self.sam_confidence is not None:
            walls = [bool(inner) for inner in Layout.of(reference.label, reference.num_classes).surrounds]
            state.decisions = self.confident(state, cohort, walls)
        logger.debug("fused source, per class: %s", [asdict(d) for d in state.decisions])
        return state

    def confident(self, state: FusedState, cohort: Cohort, walls: list[bool] | None = None) -> list[Decision]:
        """The decisions with, per class, the median SAM-predicted IoU of the chosen source's masks over a sample of
        the cohort, and the warped label itself where that is below ``sam_confidence`` and either the locator supports
        the warped label at least as much as SAM's masks (median ``support``) or the class is a wall (``walls`` (C,):
        it encloses another class in the reference)."""
        walls = walls or [False] * len(state.decisions)
        step = max(1, len(cohort.items) // self.confidence_sample)

        def measure(key: str, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            pred = self._sam(state, key, image, cohort.store)
            itself = registered(self.primary.warped(state.primary, image), image.shape[:2])
            probs = self._located(state, key, image, cohort.store)
            return pred.iou, _supports(probs, pred), _supports(probs, itself)

        sample = range(0, len(cohort.items), step)[: self.confidence_sample]
        measured = cohort.map(measure, "confidence", sample)
        iou, sam_support, label_support = (torch.stack(m) for m in zip(*measured))
        decisions = []
        for c, d in enumerate(state.decisions):
            median = round(float(iou[:, c].median()), 3)
            supported = bool(label_support[:, c].median() >= sam_support[:, c].median())
            unsure = median < self.sam_confidence and (supported or walls[c])
            source = "registration" if unsure else d.source
            decisions.append(Decision(d.primary, source, d.agreement, d.warp_similarity, median, bool(unsure)))
        return decisions

    def _located(self, state: FusedState, key: str, image: np.ndarray, store: EmbeddingStore) -> torch.Tensor:
        """The locator's class probabilities (C + 1, H, W) for one image."""
        return PatchClassifier.upsample(self.locator.grid(state.locator, key, image, store), image.shape[:2])

    def _sam(self, state: FusedState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        """Per class, the SAM masks of the chosen source (the warp's or the other's)."""
        use = state.use_primary
        warped = self.primary.predict(state.primary, key, image, store) if use.any() else None
        if use.all():
            return warped
        other = self._other(state, key, image, store)
        return other if warped is None else combine(use, warped, other)

    def _other(self, state: FusedState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        if state.fallback is not None:
            return self.fallback.predict(state.fallback, key, image, store)
        return self.locator.predict(state.locator, key, image, store)

    def decisions(self, state: FusedState) -> list[Decision]:
        return state.decisions

    def supports(
        self, state: FusedState, key: str, image: np.ndarray, store: EmbeddingStore, pred: Prediction
    ) -> torch.Tensor:
        return _supports(self._located(state, key, image, store), pred)

    def predict(self, state: FusedState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        use, label = state.use_primary, state.use_registration
        sam = ~label
        soft = self.primary.warped(state.primary, image) if (use | label).any() else None
        pred = None
        if (use & sam).any():
            pred = self.primary.from_warped(soft, key, image, store, state.primary.prototypes, state.primary.parts)
        if (~use & sam).any():
            other = self._other(state, key, image, store)
            pred = other if pred is None else combine(use, pred, other)
        sources = [d.source for d in state.decisions]
        probs = self._located(state, key, image, store)
        if self.switch_margin is not None and (use & sam).any():
            pred, sources = self.switch(state, pred, sources, probs, key, image, store)
        if label.any():
            itself = registered(soft, image.shape[:2])
            pred = itself if pred is None else combine(label, itself, pred)
        pred = self.absent(state, pred, probs)
        pred.support = _supports(probs, pred)
        pred.sources = sources
        return pred

    def switch(
        self,
        state: FusedState,
        pred: Prediction,
        sources: list[str],
        probs: torch.Tensor,
        key: str,
        image: np.ndarray,
        store: EmbeddingStore,
    ) -> tuple[Prediction, list[str]]:
        """Per class the warp serves with SAM, the locator's own SAM mask instead of ``pred``'s where the locator's
        probabilities ``probs`` (C + 1, H, W) support it more than ``switch_margin`` better (the warp lost the structure
        in this image) and does not lie mostly on another class's mask; and the per-class source names after the
        switch."""
        located = self.locator.predict(state.locator, key, image, store, probs)
        gain = _supports(probs, located) - _supports(probs, pred)
        switch = own_places((gain > self.switch_margin) & state.use_primary & ~state.use_registration, located, pred)
        if not switch.any():
            return pred, sources
        sources = [self.locator.kind if switch[c] else s for c, s in enumerate(sources)]
        return combine(switch, located, pred), sources

    def absent(self, state: FusedState, pred: Prediction, probs: torch.Tensor) -> Prediction:
        """``pred`` with the SAM-served classes this image lacks (``absent_margin``) emptied and marked not found;
        ``probs`` (C + 1, H, W): the locator's class probabilities for the image."""
        if self.absent_margin is None:
            return pred
        median = torch.tensor([d.sam_iou if d.sam_iou is not None else float("nan") for d in state.decisions])
        doubtful = (pred.iou < median - self.absent_margin) & ~state.use_registration & pred.found
        if not doubtful.any():
            return pred
        masks = pred.logits > 0
        logits, found = pred.logits.clone(), pred.found.clone()
        for c in torch.nonzero(doubtful)[:, 0].tolist():
            if support(probs[c + 1].numpy(), masks[c].numpy()) < self.absent_support:
                logits[c], found[c] = -20.0, False
        return Prediction(logits, pred.iou, found, pred.prompts)

    def state_dict(self, state: FusedState) -> dict[str, Any]:
        return {
            "decisions": [asdict(d) for d in state.decisions],
            "primary": save_source(self.primary, state.primary),
            "locator": save_source(self.locator, state.locator),
            "fallback": None if state.fallback is None else save_source(self.fallback, state.fallback),
            "settings": {
                "switch_margin": self.switch_margin,
                "absent_margin": self.absent_margin,
                "absent_support": self.absent_support,
            },
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["FusedSource", FusedState]:
        primary, primary_state = load_source(state["primary"], reference, store, device)
        locator, locator_state = load_source(state["locator"], reference, store, device)
        fallback = fallback_state = None
        if state["fallback"] is not None:
            fallback, fallback_state = load_source(state["fallback"], reference, store, device)
        decisions = [Decision(**d) for d in state["decisions"]]
        source = cls(primary, locator, fallback, **state.get("settings", {"switch_margin": None}))
        return source, FusedState(decisions, primary_state, locator_state, fallback_state)
