"""Applies a fitted one-shot model to one prepared target, slice by slice (MONAI ``Inferer``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

from bundle.dataset import Target
from bundle.model import OneShotModel
from bundle.prediction import Prediction
from bundle.qc import outline_stability
from bundle.store import EmbeddingStore
from bundle.transforms import resize_label

__all__ = ["OneShotInferer"]


class OneShotInferer(Inferer):
    """``inferer(target, model, store)`` -> (Z, H, W) class-index label map of the target at its input size.

    Args:
        postprocessing: callable on a (1, H, W) class-index tensor (MONAI transforms), applied at the processing
            size before resizing to the input's.
    """

    def __init__(self, postprocessing: Any | None = None):
        super().__init__()
        self.postprocessing = postprocessing

    def slice_label(
        self, model: OneShotModel, key: str, image: np.ndarray, store: EmbeddingStore
    ) -> tuple[np.ndarray, Prediction]:
        """Post-processed (H, W) class indices of one prepared slice, and the prediction it was made from."""
        label, pred = model.segment(key, image, store)
        if self.postprocessing is not None:
            label = np.asarray(self.postprocessing(torch.from_numpy(label)[None]))[0].astype(np.int64)
        return label, pred

    @staticmethod
    def stability(
        model: OneShotModel, key: str, image: np.ndarray, store: EmbeddingStore, label: np.ndarray, pred: Prediction
    ) -> torch.Tensor:
        """Per class, the ``qc.outline_stability`` of its mask in one slice's (H, W) class indices: (C,); NaN for a
        class the warped label serves (``pred.sources``), and for every class without a SAM backend."""
        values = torch.full((model.num_classes,), torch.nan, dtype=torch.float64)
        if store.sam is None:
            return values
        embedding = store.embedding(key, image)
        sources = pred.sources or [""] * model.num_classes
        for c in range(model.num_classes):
            if sources[c] != "registration":
                values[c] = outline_stability(store.sam, embedding, label == c + 1, model.parts[c])
        return values

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self, inputs: Target, network: OneShotModel, store: EmbeddingStore, review: bool = True
    ) -> tuple[np.ndarray, dict[str, list[int]], dict[str, np.ndarray]]:
        """The label map (Z, H, W); per slice key, the indices of classes no prompt was found for; and per segmented
        slice and class (S, C) the review signals ``iou`` (SAM's predicted IoU), ``stability``
        (``qc.outline_stability`` of the class's mask) and ``support`` (the locator's),
        NaN where the class was not found or the source gives none, and ``source`` (the source that served it, ''
        where the model's source does not say). ``review`` False: no ``stability`` (NaN), which costs one more SAM
        decode per class and slice, for callers that only want the label map."""
        label = np.zeros(inputs.shape, np.int64)
        missing: dict[str, list[int]] = {}
        signals: dict[str, list[np.ndarray]] = {"iou": [], "stability": [], "support": []}
        sources: list[list[str]] = []
        for z, key in enumerate(inputs.keys):
            if key is None:
                continue
            lab, pred = self.slice_label(network, key, inputs.images[key], store)
            label[z] = lab if lab.shape == label.shape[1:] else resize_label(lab, label.shape[1:])
            found = pred.found.numpy().astype(bool)
            stable = (
                self.stability(network, key, inputs.images[key], store, lab, pred)
                if review
                else torch.full((len(found),), torch.nan)
            )
            for name, value in (("iou", pred.iou), ("stability", stable), ("support", pred.support)):
                value = np.full(len(found), np.nan) if value is None else value.float().numpy()
                signals[name].append(np.where(found, value, np.nan))
            sources.append(pred.sources or [""] * len(found))
            if not found.all():
                missing[key] = np.flatnonzero(~found).tolist()
        shape = (-1, network.num_classes)
        out = {k: np.array(v, dtype=float).reshape(shape) for k, v in signals.items()}
        out["source"] = np.array(sources, dtype=object).reshape(shape)
        return label, missing, out
