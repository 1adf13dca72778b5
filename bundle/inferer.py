"""One-shot inferer: reference (image, label) + targets -> per-class SAM logits for every target.

Med-PerSAM (SPEC 2.1): test-time-trained warping carries the reference label onto each target, the warped label
becomes SAM's prompts, SAM's answer is refined, and the warping is retrained on SAM's pseudo-labels for a number
of rounds. The ``registration`` strategy stops after the warp (the warped label is the answer, no SAM).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import Inferer
from tqdm import tqdm

from bundle.engine import WarpTrainer
from bundle.prompts import PromptGenerator, class_prototypes
from bundle.sam import Embedding, SamBackend
from bundle.transforms import from_working, normalize_intensity, one_hot, to_working

__all__ = ["OneShotInferer", "Prediction"]

logger = logging.getLogger(__name__)

STRATEGIES = ("warp", "registration")


@dataclass
class Prediction:
    """Per-class logits (C, H, W) for one target, positive = inside; ``iou`` is SAM's estimate per class."""

    logits: torch.Tensor
    iou: torch.Tensor

    def label(self) -> np.ndarray:
        """(H, W) label map with classes 1..C; background where every logit is negative."""
        best, idx = self.logits.max(0)
        return np.where(best.numpy() > 0, idx.numpy() + 1, 0).astype(np.int64)


class OneShotInferer(Inferer):
    """Segments a cohort from one labelled reference.

    Args:
        sam: SAM backend (encodes every image once per run).
        trainer: test-time trainer of the warping network.
        prompter: turns a soft mask per class into SAM prompts.
        strategy: ``"warp"`` (Med-PerSAM) or ``"registration"`` (warped label only).
        working_size: long side of the frame the warping network works in.
        rounds: retraining rounds on SAM pseudo-labels after the first pass.
        refine: refinement passes (SAM output -> new prompts -> SAM).
        refine_multimask: in refinement passes, ask SAM for three masks and keep the best predicted IoU.
        pseudo_iou_weight: weight pseudo-labels by SAM's predicted IoU.
        progress: progress bars.
    """

    def __init__(
        self,
        sam: SamBackend,
        trainer: WarpTrainer,
        prompter: PromptGenerator,
        strategy: str = "warp",
        working_size: int = 128,
        rounds: int = 1,
        refine: int = 1,
        refine_multimask: bool = False,
        pseudo_iou_weight: bool = True,
        progress: bool = True,
    ):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.sam, self.trainer, self.prompter = sam, trainer, prompter
        self.strategy, self.working_size = strategy, working_size
        self.rounds, self.refine, self.refine_multimask = rounds, refine, refine_multimask
        self.pseudo_iou_weight, self.progress = pseudo_iou_weight, progress
        self.embeddings: dict[str, Embedding] = {}
        self.timings: dict[str, float] = {}

    def _clock(self, stage: str, start: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + time.time() - start, 2)

    def _bar(self, items, desc: str):
        return tqdm(items, desc=desc, leave=False, disable=not self.progress)

    def embed(self, key: str, image: np.ndarray) -> Embedding:
        """Encoder output for an image, computed once per run."""
        if key not in self.embeddings:
            self.embeddings[key] = self.sam.encode(image)
        return self.embeddings[key]

    def _working(self, image: np.ndarray) -> torch.Tensor:
        return to_working(torch.from_numpy(normalize_intensity(image))[None], self.working_size)

    def __call__(  # type: ignore[override]
        self, ref_image: np.ndarray, ref_label: np.ndarray, num_classes: int, targets: list[tuple[str, np.ndarray]]
    ) -> list[Prediction]:
        """Segment ``targets`` ((id, (H, W[, 3]) image) pairs) given the reference and its label (classes 1..C)."""
        S = self.working_size
        ref_onehot = one_hot(torch.from_numpy(ref_label), num_classes)
        self.trainer.setup(
            self._working(ref_image),
            to_working(ref_onehot, S, mode="nearest"),
            torch.stack([self._working(img) for _, img in targets]),
        )
        prototypes = None
        use_sam = self.strategy != "registration"
        if use_sam:
            start = time.time()
            if self.prompter.num_points > 0:  # the reference is encoded only for the points' class prototypes
                prototypes = class_prototypes(self.embed("__reference__", ref_image), ref_onehot[1:], self.sam.img_size)
            for key, img in self._bar(targets, "SAM encoding"):
                self.embed(key, img)
            self._clock("sam_encoding_s", start)
        start = time.time()
        self.trainer.fit()
        self._clock("warp_training_s", start)
        rounds = self.rounds if use_sam else 0
        predictions: list[Prediction] = []
        for r in range(rounds + 1):
            start = time.time()
            warped = self.trainer.predict()
            predictions = []
            for (key, img), soft in self._bar(list(zip(targets, warped)), f"SAM round {r}"):
                probs = from_working(soft, img.shape[:2])[1:].clamp(0, 1)
                if use_sam:
                    predictions.append(self.segment(self.embeddings[key], probs, prototypes))
                else:
                    predictions.append(Prediction(torch.logit(probs.clamp(1e-4, 1 - 1e-4)), torch.ones(num_classes)))
            self._clock("prompting_and_sam_decoding_s", start)
            if r < rounds:
                start = time.time()
                self._retrain(predictions, num_classes)
                self._clock("warp_training_s", start)
        return predictions

    def _retrain(self, predictions: list[Prediction], num_classes: int) -> None:
        labels = torch.stack(
            [
                to_working(one_hot(torch.from_numpy(p.label()), num_classes), self.working_size, "nearest")
                for p in predictions
            ]
        )
        weights = torch.stack([p.iou.mean() for p in predictions]) if self.pseudo_iou_weight else None
        self.trainer.set_pseudo_labels(labels, weights)
        self.trainer.fit()

    @torch.no_grad()
    def segment(self, embedding: Embedding, probs: torch.Tensor, prototypes: torch.Tensor | None = None) -> Prediction:
        """SAM on prompts from (C, H, W) probabilities, then ``refine`` passes; classes without a mask stay empty."""
        C = probs.shape[0]
        logits = torch.full((C, *embedding.original_size), -20.0)
        iou = torch.zeros(C)
        prompts = self.prompter(self.sam, embedding, probs, prototypes)
        keep = prompts.valid
        if not keep.any():
            return Prediction(logits, iou)
        out, score = self.sam.predict(embedding, **prompts.rows(keep), multimask=False)
        logits[keep], iou[keep] = out[:, 0].cpu(), score[:, 0].cpu()
        for _ in range(self.refine):
            # SAM's answer, binarised, becomes the next mask prompt and box (raw SAM logits as a mask prompt
            # make LiteMedSAM drift: measured in docs/benchmarks.md)
            prompts = self.prompter(self.sam, embedding, (logits > 0).float(), prototypes)
            keep = prompts.valid
            if not keep.any():
                break
            out, score = self.sam.predict(embedding, **prompts.rows(keep), multimask=self.refine_multimask)
            best = score.argmax(1)
            rows = torch.arange(len(best))
            logits[keep], iou[keep] = out[rows, best].cpu(), score[rows, best].cpu()
        return Prediction(logits, iou)
