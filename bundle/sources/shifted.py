"""Any source with pattern shifting (``ips: true``): SAM's mask tokens shifted per image by a network fitted on the
reference's views, for every decode the source makes in predicting and, unless told otherwise, in fitting too. SAM's
weights never change."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from bundle.classifier import reference_views
from bundle.decoder import SamDecoder
from bundle.ips import PatternShift, fit_shift, shifted
from bundle.prediction import Prediction
from bundle.sam import Embedding
from bundle.sources.base import Cohort, Source, load_source, register, save_source
from bundle.store import EmbeddingStore, Reference

__all__ = ["ShiftedSource", "ShiftedStore"]

logger = logging.getLogger(__name__)


class ShiftedStore:
    """An ``EmbeddingStore`` whose embeddings decode with ``shift`` (the cached ones are left unshifted)."""

    def __init__(self, store: EmbeddingStore, shift: PatternShift):
        self._store, self._shift = store, shift

    def embedding(self, key: str, image: np.ndarray, levels: bool = False) -> Embedding:
        return self._with_shift(self._store.embedding(key, image, levels))

    def reference_embedding(
        self, reference: Reference, view: int = 0, image: np.ndarray | None = None, levels: bool = False
    ) -> Embedding:
        return self._with_shift(self._store.reference_embedding(reference, view, image, levels))

    @torch.no_grad()
    def _with_shift(self, embedding: Embedding) -> Embedding:
        return shifted(embedding, self._shift)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@register("ips")
class ShiftedSource(Source):
    """``source`` decoding with a pattern shift fitted on the reference and its augmented views.

    Args:
        source: the source to shift.
        decoder: the SAM decoder whose SAM and prompts the shift is trained for (None: a predicting source).
        steps: optimisation steps of the shift (each decodes one view's classes with gradients).
        lr: Adam learning rate.
        hidden: hidden width of the shift's MLP.
        box_only: train on box-only prompts every other step too (the prompter's own prompts otherwise).
        in_fitting: the source is fitted with shifted decodes too (its self-training, its choices); False: fitted as
            without the shift, which then changes only the masks it predicts.
        seed: seeds the views' prompt perturbations.
    """

    kind = "ips"

    def __init__(
        self,
        source: Source,
        decoder: SamDecoder | None = None,
        steps: int = 40,
        lr: float = 1e-3,
        hidden: int = 1024,
        box_only: bool = False,
        in_fitting: bool = True,
        seed: int = 0,
    ):
        self.source, self.decoder = source, decoder
        self.steps, self.lr, self.hidden, self.seed = int(steps), float(lr), int(hidden), seed
        self.box_only, self.in_fitting = bool(box_only), bool(in_fitting)

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> dict[str, Any]:
        if self.decoder is None:
            raise RuntimeError("this ShiftedSource was loaded from a fitted model: it predicts, it cannot fit")
        store, decoder = cohort.store, self.decoder
        views = [(reference.image, reference.label), *reference_views(reference.image, reference.label)]
        # the same views, in the same slots, as the classifier's: each is encoded once per run
        labelled = [(store.reference_embedding(reference, v, img), lab) for v, (img, lab) in enumerate(views)]
        channels = int(labelled[0][0].features.shape[1])
        tokens = int(decoder.sam.model.mask_decoder.num_mask_tokens)
        shift = PatternShift(channels, tokens, self.hidden)
        shift, log = fit_shift(
            shift,
            decoder.sam,
            decoder.prompter,
            labelled,
            reference.num_classes,
            self.steps,
            self.lr,
            self.seed,
            box_only=self.box_only,
        )
        store.clock.add("pattern_shift_s", time.time() - log["seconds"])
        logger.info("pattern shift: %d steps, loss %.3f -> %.3f", log["steps"], log["first_loss"], log["last_loss"])
        inner = cohort.with_store(ShiftedStore(store, shift)) if self.in_fitting else cohort
        return {"shift": shift, "inner": self.source.fit(reference, inner, classes)}

    def predict(self, state: dict[str, Any], key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        return self.source.predict(state["inner"], key, image, ShiftedStore(store, state["shift"]))

    def decisions(self, state: dict[str, Any]) -> list[Any]:
        return self.source.decisions(state["inner"])

    def state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        shift: PatternShift = state["shift"]
        return {
            "shift": {"config": shift.config(), "weights": shift.state_dict()},
            "inner": save_source(self.source, state["inner"]),
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["ShiftedSource", dict[str, Any]]:
        inner_source, inner_state = load_source(state["inner"], reference, store, device)
        shift = PatternShift(**state["shift"]["config"])
        shift.load_state_dict(state["shift"]["weights"])
        shift.to(device).eval()
        return cls(inner_source), {"shift": shift, "inner": inner_state}
