"""Applies a fitted one-shot model to one prepared target, slice by slice (MONAI ``Inferer``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

from bundle.dataset import Target
from bundle.model import OneShotModel
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
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Post-processed (H, W) class indices of one prepared slice, and which classes were found (C,)."""
        label, found = model.segment(key, image, store)
        if self.postprocessing is not None:
            label = np.asarray(self.postprocessing(torch.from_numpy(label)[None]))[0].astype(np.int64)
        return label, found

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self, inputs: Target, network: OneShotModel, store: EmbeddingStore
    ) -> tuple[np.ndarray, dict[str, list[int]]]:
        """The label map (Z, H, W) and, per slice key, the indices of classes no prompt was found for."""
        label = np.zeros(inputs.shape, np.int64)
        missing: dict[str, list[int]] = {}
        for z, key in enumerate(inputs.keys):
            if key is None:
                continue
            lab, found = self.slice_label(network, key, inputs.images[key], store)
            label[z] = lab if lab.shape == label.shape[1:] else resize_label(lab, label.shape[1:])
            if not found.all():
                missing[key] = np.flatnonzero(~found.numpy()).tolist()
        return label, missing
