"""PerSAM baseline: one positive and one negative point per class from prototype similarity, then a cascaded
refinement (the first mask and its box join the points)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bundle.decoder import SamDecoder
from bundle.prediction import Prediction
from bundle.prompts import Prompts, class_prototypes, masks_to_boxes, persam_prompts, similarity_map
from bundle.sources.base import Cohort, Source, register
from bundle.store import EmbeddingStore, Reference

__all__ = ["PerSamSource"]


@register("persam")
class PerSamSource(Source):
    """Prototype similarity -> top-1 positive and negative point per class, then mask + box refinement."""

    kind = "persam"

    def __init__(self, decoder: SamDecoder):
        self.decoder = decoder

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Nothing is trained: the state is the class prototypes (C, D) of the reference (zero rows: no pixel)."""
        masks = reference.onehot[1:]
        embedding = cohort.store.reference_embedding(reference)
        return class_prototypes(embedding, masks, self.decoder.sam.img_size).cpu()

    def predict(self, state: torch.Tensor, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        sam, embedding = self.decoder.sam, store.embedding(key, image)
        has = state.abs().sum(1) > 0
        prompts = persam_prompts(similarity_map(embedding, state, sam.img_size).cpu(), has)
        pred = Prediction.empty(len(has), embedding.original_size)
        self.decoder.decode(embedding, prompts, True, pred.logits, pred.iou)
        first = (pred.logits > 0).float()
        box, valid = masks_to_boxes(first.numpy().astype(bool))
        refined = Prompts(
            box, prompts.points, prompts.point_labels, sam.mask_prompt(first, embedding.original_size), valid & has
        )
        self.decoder.decode(embedding, refined, True, pred.logits, pred.iou)
        return Prediction(pred.logits, pred.iou, has.clone(), prompts)

    def state_dict(self, state: torch.Tensor) -> dict[str, Any]:
        return {"prototypes": state, "decoder": self.decoder.settings()}

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["PerSamSource", torch.Tensor]:
        return cls(SamDecoder.from_settings(store.sam, state["decoder"])), state["prototypes"]
