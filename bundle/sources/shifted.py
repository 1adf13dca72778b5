"""Any source with pattern shifting (``ips: true``): SAM's mask tokens shifted per image by a network fitted on the
reference's views (optionally then on the cohort's own masks too), for every decode the source makes in predicting
and, unless told otherwise, in fitting too. SAM's weights never change."""

from __future__ import annotations

import copy
import dataclasses
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
        pseudo: after the source is fitted, the shift trains ``steps`` more on the reference's views and the masks the
            shifted source predicts for this many cohort images (evenly spaced), each class weighted by SAM's
            predicted IoU (0: the reference's views only).
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
        pseudo: int = 0,
        seed: int = 0,
    ):
        self.source, self.decoder, self.pseudo = source, decoder, int(pseudo)
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
        state = self.source.fit(reference, inner, classes)
        if self.pseudo > 0 and len(cohort.items):
            shift = self._fit_on_cohort(copy.deepcopy(shift), state, labelled, reference.num_classes, cohort)
        return {"shift": shift, "inner": state}

    def _fit_on_cohort(
        self,
        shift: PatternShift,
        state: Any,
        labelled: list[tuple[Embedding, np.ndarray]],
        num_classes: int,
        cohort: Cohort,
    ) -> PatternShift:
        """``shift`` trained further on ``labelled`` and the shifted source's own masks for ``pseudo`` cohort images,
        each class weighted by SAM's predicted IoU (0 where it was not found)."""
        start, store = time.time(), cohort.store
        n = len(cohort.items)
        indices = sorted(set(np.linspace(0, n - 1, min(self.pseudo, n)).round().astype(int).tolist()))
        shifted_store = ShiftedStore(store, shift)

        def answer(key: str, image: np.ndarray) -> tuple[Embedding, np.ndarray, torch.Tensor]:
            pred = self.source.predict(state, key, image, shifted_store)
            e = store.embedding(key, image)  # on the CPU: gathered from its owner with several processes
            e = dataclasses.replace(e, features=e.features.cpu(), levels=None, token_shift=None)
            return e, pred.label().astype(np.uint8), (pred.iou * pred.found).clamp(0, 1)

        answers = cohort.map(answer, "pattern shift on the cohort's masks", indices)
        device = labelled[0][0].features.device
        views = labelled + [(dataclasses.replace(e, features=e.features.to(device)), lab) for e, lab, _ in answers]
        weights = [[1.0] * num_classes] * len(labelled) + [w.tolist() for _, _, w in answers]
        shift, log = fit_shift(
            shift.train(),
            self.decoder.sam,
            self.decoder.prompter,
            views,
            num_classes,
            self.steps,
            self.lr,
            self.seed + 1,
            box_only=self.box_only,
            weights=weights,
        )
        store.clock.add("pattern_shift_s", start)
        logger.info(
            "pattern shift on %d cohort masks: loss %.3f -> %.3f", len(answers), log["first_loss"], log["last_loss"]
        )
        return shift

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
