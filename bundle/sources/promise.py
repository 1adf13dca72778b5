"""ProMISe's auto-prompting as a source: a small network on the frozen encoder's stage outputs places each class's box
(and optionally points), fitted on the reference's views, then on the cohort's own confident SAM masks."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bundle.apm import AutoPrompter, fit_prompter, unit_to_pixels
from bundle.classifier import REFERENCE_VIEWS, reference_views
from bundle.decoder import SamDecoder
from bundle.prediction import Prediction
from bundle.prompts import Prompts
from bundle.sam import Embedding
from bundle.sources.base import Cohort, Source, register
from bundle.store import EmbeddingStore, Reference

__all__ = ["PromiseSource", "PromiseState"]

logger = logging.getLogger(__name__)


@dataclass
class PromiseState:
    """A fitted auto-prompter and the reference's part count per class (C,)."""

    prompter: AutoPrompter
    parts: list[int] | None = None


@register("promise")
class PromiseSource(Source):
    """Boxes (and points) from ``AutoPrompter``; SAM's first mask then prompts SAM again as box + mask (per part).

    Args:
        decoder: the SAM decoder (its prompter turns the first mask into the second pass's prompts).
        num_points: positive points per class besides the box (0: the box alone; LiteMedSAM was tuned on boxes).
        steps: optimisation steps of each fit.
        mask_steps: of those, the last steps that also decode through SAM (points only).
        lr: AdamW learning rate.
        width: channels of the prompter's body.
        self_training: rounds refitted on the reference's views plus the cohort's SAM masks (weighted by SAM's IoU).
        margin: the predicted box is widened by this share of its size on every side.
        seed: seeds initialisation and sampling.
    """

    kind = "promise"

    def __init__(
        self,
        decoder: SamDecoder,
        num_points: int = 0,
        steps: int = 300,
        mask_steps: int = 60,
        lr: float = 3e-3,
        width: int = 64,
        self_training: int = 1,
        margin: float = 0.05,
        seed: int = 0,
    ):
        self.decoder, self.num_points, self.steps, self.mask_steps = decoder, int(num_points), int(steps), mask_steps
        self.lr, self.width, self.self_training, self.seed = float(lr), int(width), int(self_training), seed
        self.margin = float(margin)

    def _fit(self, views: list, num_classes: int) -> AutoPrompter:
        torch.manual_seed(self.seed)
        channels = int(views[0][0].levels.shape[1])
        prompter = AutoPrompter(channels, num_classes, self.num_points, self.width)
        prompter, log = fit_prompter(
            prompter, self.decoder.sam, views, self.steps, self.lr, self.seed, self.mask_steps if self.num_points else 0
        )
        logger.info("auto-prompter: %d views, loss %.3f -> %.3f", len(views), log["first_loss"], log["last_loss"])
        return prompter

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> PromiseState:
        start = time.time()
        store, C = cohort.store, reference.num_classes
        images = [(reference.image, reference.label), *reference_views(reference.image, reference.label)]
        # the classifier's views in the classifier's slots (each encoded once per run), less the mirrored one: a
        # mirror moves a left-hand class to the right, which a prompter that places classes must not learn
        keep = [0] + [i for i, (_, _, mirrored) in enumerate(REFERENCE_VIEWS, start=1) if not mirrored]
        views = [(store.reference_embedding(reference, v, images[v][0], levels=True), images[v][1], 1.0) for v in keep]
        state = PromiseState(self._fit(views, C), reference.parts)

        def pseudo_label(key: str, img: np.ndarray) -> tuple[Embedding, np.ndarray, float]:
            pred = self.predict(state, key, img, store)
            confidence = float(pred.iou[pred.found].mean()) if pred.found.any() else 0.0
            return store.embedding(key, img, levels=True), pred.label(), confidence

        for r in range(self.self_training):
            pseudo = cohort.map(pseudo_label, f"auto-prompter round {r}")
            state = PromiseState(self._fit(views + pseudo, C), reference.parts)
        store.clock.add("auto_prompting_s", start)
        return state

    def prompts(self, state: PromiseState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prompts:
        """The prompter's box (and points) per class, in image pixels, clipped to the image."""
        embedding = store.embedding(key, image, levels=True)
        with torch.no_grad():
            boxes, points = state.prompter(embedding.levels)
        boxes, points = unit_to_pixels(boxes.float().cpu(), points.float().cpu(), embedding)
        # a box a little too tight cuts the structure off, one a little too loose SAM forgives: widen by the margin
        pad = (boxes[:, 2:] - boxes[:, :2]) * self.margin
        boxes = torch.cat([boxes[:, :2] - pad, boxes[:, 2:] + pad], dim=1)
        H, W = embedding.original_size
        boxes = torch.stack([boxes[:, 0].clamp(0, W - 1), boxes[:, 1].clamp(0, H - 1),
                             boxes[:, 2].clamp(0, W - 1), boxes[:, 3].clamp(0, H - 1)], dim=1)  # fmt: skip
        C, P = points.shape[:2]
        labels = torch.ones(C, P, dtype=torch.int64)
        return Prompts(boxes, points if P else None, labels if P else None, None, torch.ones(C, dtype=torch.bool))

    def predict(self, state: PromiseState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        embedding = store.embedding(key, image, levels=True)
        prompts = self.prompts(state, key, image, store)
        first = Prediction.empty(len(prompts.valid), embedding.original_size)
        self.decoder.decode(embedding, prompts, False, first.logits, first.iou)
        pred = self.decoder.segment(embedding, (first.logits > 0).float(), None, state.parts)
        return Prediction(pred.logits, pred.iou, pred.found, prompts)

    def state_dict(self, state: PromiseState) -> dict[str, Any]:
        prompter = state.prompter
        weights = {k: v.detach().cpu().clone() for k, v in prompter.state_dict().items()}
        return {
            "prompter": {"config": prompter.config(), "weights": weights},
            "parts": state.parts,
            "decoder": self.decoder.settings(),
            "num_points": self.num_points,
            "margin": self.margin,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["PromiseSource", PromiseState]:
        prompter = AutoPrompter(**state["prompter"]["config"])
        prompter.load_state_dict(state["prompter"]["weights"])
        source = cls(
            SamDecoder.from_settings(store.sam, state["decoder"]),
            num_points=state["num_points"],
            margin=state["margin"],
        )
        return source, PromiseState(copy.deepcopy(prompter).to(device).eval(), state.get("parts"))
