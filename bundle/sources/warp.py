"""Warping (Med-PerSAM): a network trained at test time carries the reference label onto each image; the warped label
gives SAM its box + mask (+ point) prompts. Without a decoder this is plain registration (the warped label itself).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bundle.decoder import SamDecoder
from bundle.engine import WarpTrainer
from bundle.networks import WarpNet
from bundle.prediction import Prediction
from bundle.prompts import class_prototypes
from bundle.sources.base import Cohort, Source, register
from bundle.store import EmbeddingStore, Reference
from bundle.transforms import from_working, normalize_intensity, one_hot, to_working

__all__ = ["WarpSource", "WarpState", "registered", "working_image"]


def working_image(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W[, 3]) image -> (1, S, S) grey image in [0, 1] in the warping network's frame."""
    return to_working(torch.from_numpy(normalize_intensity(image))[None], size)


def registered(soft: torch.Tensor, size: tuple[int, int]) -> Prediction:
    """The warped label itself as a prediction at ``size`` from its soft one-hot (K, S, S) in the working frame
    (logits of the warped probabilities; predicted IoU 1)."""
    probs = from_working(soft, size)[1:].clamp(0, 1)
    return Prediction(torch.logit(probs.clamp(1e-4, 1 - 1e-4)), torch.ones(probs.shape[0]))


@dataclass
class WarpState:
    """A trained warping network and the reference it carries: image (1, S, S), one-hot label (K, S, S)."""

    network: WarpNet
    moving: torch.Tensor
    moving_label: torch.Tensor
    prototypes: torch.Tensor | None = None  # (C, D) class prototypes for point prompts
    parts: list[int] | None = None  # (C,) separate parts of each class in the reference

    @torch.no_grad()
    def fields(self, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement fields (N, 2, S, S) from the reference to the images ``fixed`` (N, 1, S, S)."""
        device = next(self.network.parameters()).device
        return self.network(self.moving[None].to(device), fixed.to(device))

    @torch.no_grad()
    def warp(self, x: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """One (K, S, S) tensor of the reference warped by each field of ``ddf``: (N, K, S, S)."""
        return self.network.warp_image(x[None].to(ddf.device).expand(len(ddf), -1, -1, -1), ddf)


@register("warp", "registration")
class WarpSource(Source):
    """Warped reference label -> SAM prompts (``decoder``), or the warped label itself (``decoder`` None).

    Args:
        trainer: test-time trainer of the warping network (None for a predicting source).
        decoder: SAM prompt-to-mask step; None: registration, no SAM.
        working_size: long side of the warping network's frame.
        rounds: retraining rounds on SAM's pseudo-labels after the first training.
        pseudo_iou_weight: weight pseudo-labels by SAM's predicted IoU.
        similarity_margin: pixels the warped structure is grown by when ``similarity`` compares appearance.
    """

    def __init__(
        self,
        trainer: WarpTrainer | None,
        decoder: SamDecoder | None = None,
        working_size: int = 128,
        rounds: int = 0,
        pseudo_iou_weight: bool = True,
        similarity_margin: int = 3,
    ):
        self.trainer, self.decoder, self.working_size = trainer, decoder, int(working_size)
        self.rounds, self.pseudo_iou_weight, self.similarity_margin = int(rounds), pseudo_iou_weight, similarity_margin
        self.kind = "warp" if decoder is not None else "registration"

    def reference_frame(self, reference: Reference) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference image (1, S, S) and one-hot label (K, S, S) in the working frame."""
        S = self.working_size
        return working_image(reference.image, S), to_working(reference.onehot, S, mode="nearest")

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> WarpState:
        if self.trainer is None:
            raise RuntimeError("this warp source was loaded from a fitted model and has no trainer to fit with")
        moving, moving_label = self.reference_frame(reference)
        fixed = torch.stack([working_image(img, self.working_size) for _, img in cohort.items])
        self.trainer.setup(moving, moving_label, fixed, reference.tag)
        prototypes = None
        if self.decoder is not None and self.decoder.prompter.num_points > 0:
            embedding = cohort.store.reference_embedding(reference)
            prototypes = class_prototypes(embedding, reference.onehot[1:], self.decoder.sam.img_size)
        first = self.trainer.resume()  # the last round a killed run of this job finished
        if first is None:
            start = time.time()
            self.trainer.fit()
            cohort.store.clock.add("warp_training_s", start)
            first = 0
        state = self.trained_state(moving, moving_label, prototypes, reference.parts)

        def pseudo_label(key: str, img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            """SAM's answer as a one-hot (K, S, S) in the working frame, and its mean predicted IoU."""
            p = self.predict(state, key, img, cohort.store)
            onehot = one_hot(torch.from_numpy(p.label()), reference.num_classes)
            return to_working(onehot, self.working_size, "nearest"), p.iou.mean()

        for r in range(first, self.rounds if self.decoder is not None else 0):
            start = time.time()
            pseudo = cohort.map(pseudo_label, f"round {r}")
            cohort.store.clock.add("prompting_and_sam_decoding_s", start)
            start = time.time()
            labels = torch.stack([label for label, _ in pseudo])
            weights = torch.stack([iou for _, iou in pseudo]) if self.pseudo_iou_weight else None
            self.trainer.set_pseudo_labels(labels, weights)
            self.trainer.fit()
            cohort.store.clock.add("warp_training_s", start)
            state = self.trained_state(moving, moving_label, prototypes, reference.parts)
        return state

    def trained_state(
        self,
        moving: torch.Tensor,
        moving_label: torch.Tensor,
        prototypes: torch.Tensor | None = None,
        parts: list[int] | None = None,
    ) -> WarpState:
        """A copy of the trainer's network as it is now, with the reference it carries."""
        return WarpState(copy.deepcopy(self.trainer.network).eval(), moving, moving_label, prototypes, parts)

    def warped(self, state: WarpState, image: np.ndarray) -> torch.Tensor:
        """The reference label warped onto an image: soft one-hot (K, S, S) in the working frame."""
        fixed = working_image(image, self.working_size)[None]
        return state.warp(state.moving_label, state.fields(fixed))[0].cpu()

    def predict(self, state: WarpState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        return self.from_warped(self.warped(state, image), key, image, store, state.prototypes, state.parts)

    def from_warped(
        self,
        soft: torch.Tensor,
        key: str,
        image: np.ndarray,
        store: EmbeddingStore,
        prototypes: torch.Tensor | None = None,
        parts: list[int] | None = None,
    ) -> Prediction:
        """Prediction from a warped soft label (K, S, S) in the working frame: SAM on its prompts, or itself."""
        if self.decoder is None:
            return registered(soft, image.shape[:2])
        probs = from_working(soft, image.shape[:2])[1:].clamp(0, 1)
        return self.decoder.segment(store.embedding(key, image), probs, prototypes, parts)

    @torch.no_grad()
    def similarity(self, state: WarpState, image: np.ndarray) -> torch.Tensor:
        """How well the warp explains an image, per class: (C,) correlations in [-1, 1].

        Pearson correlation between the warped reference image and the image inside the warped structure grown by
        ``similarity_margin`` pixels (working frame). A warp that found the structure carries its appearance along
        (high); one that lost a moving structure lands on other content (low). Classes warped to fewer than 10
        pixels score 0.
        """
        m = self.similarity_margin
        fixed = working_image(image, self.working_size)[None]
        ddf = state.fields(fixed)
        warped = state.warp(state.moving, ddf)
        region = F.max_pool2d((state.warp(state.moving_label[1:], ddf) > 0.5).float(), 2 * m + 1, 1, m)
        count = region.sum((2, 3), keepdim=True)

        def centred(x: torch.Tensor) -> torch.Tensor:
            return (x - (x * region).sum((2, 3), keepdim=True) / count.clamp_min(1)) * region

        a, b = centred(warped), centred(fixed.to(ddf.device))
        ncc = (a * b).sum((2, 3)) / (a.pow(2).sum((2, 3)) * b.pow(2).sum((2, 3))).sqrt().clamp_min(1e-8)
        return torch.where(count[..., 0, 0] >= 10, ncc, torch.zeros_like(ncc))[0].cpu()

    def state_dict(self, state: WarpState) -> dict[str, Any]:
        return {
            "network": {k: v.detach().cpu().clone() for k, v in state.network.state_dict().items()},
            "network_args": state.network.config(),
            "working_size": self.working_size,
            "decoder": None if self.decoder is None else self.decoder.settings(),
            "prototypes": state.prototypes,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["WarpSource", WarpState]:
        decoder = None if state["decoder"] is None else SamDecoder.from_settings(store.sam, state["decoder"])
        source = cls(None, decoder, state["working_size"])
        network = WarpNet(**state["network_args"])
        network.load_state_dict(state["network"], strict=True)
        moving, moving_label = source.reference_frame(reference)
        network = network.to(device).eval()
        return source, WarpState(network, moving, moving_label, state.get("prototypes"), reference.parts)
