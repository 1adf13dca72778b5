"""Per-class fusion: the warp where it found the structure, else a fallback that finds it wherever it is.

Per class, over the cohort: the median Dice between the warp's and the classifier's SAM masks (agreement), and the
median correlation of the warped reference with the image around the structure (``WarpSource.similarity``). High
agreement means the anatomy sits where the warp puts it (chest X-rays) and the warp's mask prompt gives SAM the
better outline; low agreement means the structure moves or changes size (lesions, fetal heads) and the warp lost
it, unless the warp's own similarity shows it found the structure and the classifier is the one that is wrong.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from bundle.classifier import PatchClassifier
from bundle.prediction import Prediction, combine, dice
from bundle.sources.aligned import AlignedSource
from bundle.sources.base import Cohort, Source, load_source, register, save_source
from bundle.sources.classifier import ClassifierSource
from bundle.sources.warp import WarpSource
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


@dataclass
class FusedState:
    decisions: list[Decision]  # per class, in class-index order
    primary: Any
    locator: PatchClassifier
    fallback: Any | None  # None when every class keeps the warp (or there is no fallback)

    @property
    def use_primary(self) -> torch.Tensor:
        return torch.tensor([d.primary for d in self.decisions])


@register("fused")
class FusedSource(Source):
    """Per class, the ``primary`` warp where it found the structure, else the ``fallback`` (or the locator's boxes).

    Args:
        primary: the warp source.
        locator: the patch classifier source the warp is checked against.
        fallback: where the warp lost a class (e.g. ``AlignedSource``); None: the locator's own prediction.
        agreement: a class keeps the warp when the median warp-vs-classifier Dice reaches this...
        warp_similarity: ... or when the median ``WarpSource.similarity`` reaches this (None: not used).
    """

    kind = "fused"

    def __init__(
        self,
        primary: WarpSource,
        locator: ClassifierSource,
        fallback: AlignedSource | None = None,
        agreement: float = 0.73,
        warp_similarity: float | None = 0.7,
    ):
        self.primary, self.locator, self.fallback = primary, locator, fallback
        self.agreement, self.warp_similarity = float(agreement), warp_similarity

    def decide(
        self, warped: list[Prediction], located: list[Prediction], similarity: torch.Tensor | None
    ) -> list[Decision]:
        """Per class, the source to use, from the cohort's warp and locator predictions and (N, C) similarities."""
        other = (self.fallback or self.locator).kind
        pw, pc = [p.masks() for p in warped], [p.masks() for p in located]
        decisions = []
        for c in range(warped[0].logits.shape[0]):
            agree = float(np.median([dice(a[c], b[c]) for a, b in zip(pw, pc)]))
            found, sim = agree >= self.agreement, None
            if similarity is not None:
                sim = round(float(similarity[:, c].median()), 3)
                found |= self.warp_similarity is not None and sim >= self.warp_similarity
            decisions.append(Decision(found, self.primary.kind if found else other, round(agree, 3), sim))
        return decisions

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> FusedState:
        primary = self.primary.fit(reference, cohort)
        store = cohort.store
        warped = [self.primary.predict(primary, k, img, store) for k, img in cohort.bar(cohort.items, "warp")]
        similarity = torch.stack([self.primary.similarity(primary, img) for _, img in cohort.items])
        locator = self.locator.fit(reference, cohort)
        located = [self.locator.predict(locator, k, img, store) for k, img in cohort.bar(cohort.items, "classifier")]
        decisions = self.decide(warped, located, similarity)
        logger.info("fused source, per class: %s", [asdict(d) for d in decisions])
        lost = torch.tensor([not d.primary for d in decisions])
        fallback = None
        if self.fallback is not None and lost.any():
            fallback = self.fallback.fit(reference, cohort, lost, locator=locator)
        return FusedState(decisions, primary, locator, fallback)

    def decisions(self, state: FusedState) -> list[Decision]:
        return state.decisions

    def predict(self, state: FusedState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        use = state.use_primary
        warped = self.primary.predict(state.primary, key, image, store) if use.any() else None
        if use.all():
            return warped
        if state.fallback is not None:
            other = self.fallback.predict(state.fallback, key, image, store)
        else:
            other = self.locator.predict(state.locator, key, image, store)
        return other if warped is None else combine(use, warped, other)

    def state_dict(self, state: FusedState) -> dict[str, Any]:
        return {
            "decisions": [asdict(d) for d in state.decisions],
            "primary": save_source(self.primary, state.primary),
            "locator": save_source(self.locator, state.locator),
            "fallback": None if state.fallback is None else save_source(self.fallback, state.fallback),
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
        return cls(primary, locator, fallback), FusedState(decisions, primary_state, locator_state, fallback_state)
