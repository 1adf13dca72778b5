"""Feature matching (SAT / AP-MedSAM): reference patches matched to the image give point prompts and a box; SAM
decodes them, then again with the box of its first mask."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from bundle.decoder import SamDecoder
from bundle.matching import match_prompts
from bundle.prediction import Prediction
from bundle.sources.base import Cohort, Source, register
from bundle.store import EmbeddingStore, Reference

__all__ = ["MatchSource"]

logger = logging.getLogger(__name__)


@register("match")
class MatchSource(Source):
    """Forward/backward patch matching -> points + box per class.

    Args:
        decoder: SAM prompt-to-mask step.
        num_points: positive and as many negative points per class.
    """

    kind = "match"

    def __init__(self, decoder: SamDecoder, num_points: int = 8):
        self.decoder, self.num_points = decoder, int(num_points)

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Nothing is trained: the state is the reference's features (D, h, w) and masks (C, H, W)."""
        features = cohort.store.reference_features(reference)
        return {"features": features.cpu(), "masks": reference.onehot[1:]}

    def predict(self, state: dict[str, torch.Tensor], key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        embedding = store.embedding(key, image)
        prompts = match_prompts(
            state["features"], state["masks"], store.features(key, image), embedding.original_size, self.num_points
        )
        pred = Prediction.empty(prompts.valid.shape[0], embedding.original_size)
        pred.found = prompts.valid.clone()
        self.decoder.decode(embedding, prompts, True, pred.logits, pred.iou)
        self.decoder.box_pass(embedding, pred)
        if not pred.found.all():
            logger.info(
                "%s: no positive match for class(es) %s, left empty", key, (~pred.found).nonzero()[:, 0].tolist()
            )
        return Prediction(pred.logits, pred.iou, pred.found, prompts)

    def state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**state, "num_points": self.num_points, "decoder": self.decoder.settings()}

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["MatchSource", dict[str, torch.Tensor]]:
        source = cls(SamDecoder.from_settings(store.sam, state["decoder"]), state["num_points"])
        return source, {"features": state["features"], "masks": state["masks"]}
