"""The patch classifier as a source: where each structure is, from frozen features, wherever it sits.

Fitted at test time on the reference and augmented views of it, then self-trained on SAM's answers for the cohort
(weighted by SAM's confidence). Its prediction is SAM on the box of each class's most probable region (of its k most
probable regions for a class in k separate parts in the reference, e.g. both lungs as one class); its
probability maps also tell other sources (``aligned``) where a structure is and how large.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bundle.classifier import PatchClassifier, reference_views
from bundle.decoder import SamDecoder
from bundle.prediction import Prediction
from bundle.sources.base import Cohort, Source, register
from bundle.store import EmbeddingStore, Reference
from bundle.transforms import one_hot

__all__ = ["ClassifierSource"]


def _soft(label: np.ndarray, num_classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) class indices -> (C + 1, h, w) area-averaged one-hot on a feature grid."""
    oh = one_hot(torch.from_numpy(label), num_classes)
    return F.interpolate(oh[None].float(), size=grid, mode="area")[0]


@register("classifier")
class ClassifierSource(Source):
    """SAM on the box of the patch classifier's most probable region per class.

    Args:
        decoder: SAM prompt-to-mask step.
        classifier: the (unfitted) patch classifier and its training settings.
        self_training: rounds the classifier is retrained on SAM's answers for the cohort.
        max_pseudo: at most this many images of the cohort (evenly spaced) give it SAM's answers, so its memory and
            time stay bounded however large the cohort (None: all).
    """

    kind = "classifier"

    def __init__(
        self,
        decoder: SamDecoder,
        classifier: PatchClassifier | None = None,
        self_training: int = 2,
        max_pseudo: int | None = 80,
    ):
        self.decoder, self.classifier, self.self_training = decoder, classifier or PatchClassifier(), int(self_training)
        self.max_pseudo = max_pseudo

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> PatchClassifier:
        start = time.time()
        store, C = cohort.store, reference.num_classes
        base = []
        for view, (img, lab) in enumerate(
            [(reference.image, reference.label), *reference_views(reference.image, reference.label)]
        ):
            feats = store.reference_features(reference, view, img)
            base.append((feats, _soft(lab, C, tuple(feats.shape[1:])), 1.0))
        classifier = self._fitted(base, C, reference.parts)

        def answer(key: str, img: np.ndarray) -> tuple[str, torch.Tensor, float]:
            """SAM's answer for one image as (C + 1, h, w) soft labels on its feature grid, and its confidence."""
            probs = self.grid(classifier, key, img, store)  # on the feature grid, computed once for both uses
            size = store.embedding(key, img).original_size
            pred = self.predict(classifier, key, img, store, PatchClassifier.upsample(probs, size))
            confidence = float(pred.iou[pred.found].mean()) if pred.found.any() else 0.0
            return key, _soft(pred.label(), C, tuple(probs.shape[1:])), confidence

        n, indices = len(cohort.items), list(range(len(cohort.items)))
        if self.max_pseudo is not None and n > self.max_pseudo:
            indices = np.linspace(0, n - 1, self.max_pseudo).round().astype(int).tolist()
        for r in range(self.self_training):
            answers = cohort.map(answer, f"classifier round {r}", indices)
            used = [(i, a) for i, a in zip(indices, answers) if a[2] > 0]
            # only the pixels the classifier trains on are kept of each image's features (the draw fit would make)
            picks = self.classifier.picks([soft for _, soft, _ in base] + [a[1] for _, a in used])[len(base) :]
            pick = {a[0]: p for (_, a), p in zip(used, picks)}

            def sampled(key: str, img: np.ndarray, pick: dict = pick) -> torch.Tensor:
                feats = store.features(key, img).float().cpu()
                return feats.reshape(feats.shape[0], -1).T[pick[key]]

            pixels = cohort.map(sampled, f"classifier round {r} pixels", [i for i, _ in used])
            pseudo = [(x, a[1].reshape(C + 1, -1).T[p], a[2]) for x, (_, a), p in zip(pixels, used, picks)]
            classifier = self._fitted(base + pseudo, C, reference.parts)
        cohort.store.clock.add("classifier_s", start)
        return classifier

    def _fitted(self, samples: list, num_classes: int, parts: list[int]) -> PatchClassifier:
        """A fresh copy of the classifier trained on ``samples``, with the reference's ``parts`` per class."""
        classifier = copy.deepcopy(self.classifier).fit(samples, num_classes)
        classifier.parts = list(parts)
        return classifier

    @staticmethod
    def grid(state: PatchClassifier, key: str, image: np.ndarray, store: EmbeddingStore) -> torch.Tensor:
        """Class probabilities (C + 1, h, w) on the feature grid of one image."""
        feats = store.features(key, image)
        return state(feats, tuple(feats.shape[1:]))

    def predict(
        self,
        state: PatchClassifier,
        key: str,
        image: np.ndarray,
        store: EmbeddingStore,
        probs: torch.Tensor | None = None,
    ) -> Prediction:
        """``probs`` (C + 1, H, W): the class probabilities of ``image`` where already computed."""
        embedding = store.embedding(key, image)
        if probs is None:
            probs = PatchClassifier.upsample(self.grid(state, key, image, store), embedding.original_size)
        return self.decoder.from_regions(embedding, probs, state.parts)

    def state_dict(self, state: PatchClassifier) -> dict[str, Any]:
        return {"classifier": state.state_dict(), "decoder": self.decoder.settings()}

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["ClassifierSource", PatchClassifier]:
        source = cls(SamDecoder.from_settings(store.sam, state["decoder"]))
        classifier = PatchClassifier().load_state_dict(state["classifier"])
        classifier.parts = reference.parts
        return source, classifier
