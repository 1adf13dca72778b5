"""The prompt-to-mask step every source shares: prompts in, SAM's best mask per class out (encode once, decode many)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bundle.alignment import probable_region
from bundle.prediction import Prediction
from bundle.prompts import PromptGenerator, Prompts, mask_to_box, masks_to_boxes
from bundle.sam import Embedding, SamBackend

__all__ = ["SamDecoder"]


class SamDecoder:
    """Decodes prompt sets against a cached embedding with a frozen SAM.

    Args:
        sam: the SAM backend.
        prompter: turns soft masks into prompts (box, mask, points).
        refine: refinement passes (SAM's answer -> new mask and box prompts -> SAM).
        refine_multimask: in refinement passes, three masks and the best predicted IoU.
    """

    def __init__(
        self,
        sam: SamBackend,
        prompter: PromptGenerator | None = None,
        refine: int = 0,
        refine_multimask: bool = False,
    ):
        self.sam, self.prompter = sam, prompter or PromptGenerator()
        self.refine, self.refine_multimask = int(refine), bool(refine_multimask)

    def settings(self) -> dict[str, Any]:
        """What ``from_settings`` needs to rebuild this decoder around a SAM backend."""
        return {"prompter": self.prompter.settings(), "refine": self.refine, "refine_multimask": self.refine_multimask}

    @classmethod
    def from_settings(cls, sam: SamBackend, settings: dict[str, Any]) -> "SamDecoder":
        return cls(sam, PromptGenerator(**settings["prompter"]), settings["refine"], settings["refine_multimask"])

    def decode(
        self, embedding: Embedding, prompts: Prompts, multimask: bool, logits: torch.Tensor, iou: torch.Tensor
    ) -> None:
        """SAM on the valid rows of ``prompts``; writes the best mask per row into ``logits`` (C, H, W) / ``iou``."""
        keep = prompts.valid
        if not keep.any():
            return
        out, score = self.sam.predict(embedding, **prompts.rows(keep), multimask=multimask)
        best = score.argmax(1)
        rows = torch.arange(len(best))
        logits[keep], iou[keep] = out[rows, best].cpu(), score[rows, best].cpu()

    @torch.no_grad()
    def segment(self, embedding: Embedding, probs: torch.Tensor, prototypes: torch.Tensor | None = None) -> Prediction:
        """SAM on prompts from (C, H, W) probabilities, then ``refine`` passes; classes without a mask stay empty."""
        pred = Prediction.empty(probs.shape[0], embedding.original_size)
        prompts = first = self.prompter(self.sam, embedding, probs, prototypes)
        found = prompts.valid.clone()
        self.decode(embedding, prompts, False, pred.logits, pred.iou)
        for _ in range(self.refine if found.any() else 0):
            # SAM's answer, binarised, becomes the next mask prompt and box (raw SAM logits as a mask prompt
            # make LiteMedSAM drift: measured in docs/benchmarks.md)
            prompts = self.prompter(self.sam, embedding, (pred.logits > 0).float(), prototypes)
            self.decode(embedding, prompts, self.refine_multimask, pred.logits, pred.iou)
        return Prediction(pred.logits, pred.iou, found, first)

    def box_pass(self, embedding: Embedding, pred: Prediction) -> None:
        """Second pass in place: the box of each found class's first mask, multimask, best predicted IoU."""
        box, valid = masks_to_boxes((pred.logits > 0).numpy())
        valid &= pred.found
        if valid.any():
            self.decode(embedding, Prompts(box, None, None, None, valid), True, pred.logits, pred.iou)

    @torch.no_grad()
    def from_regions(self, embedding: Embedding, probs: torch.Tensor) -> Prediction:
        """SAM on the box of the most probable connected region of each class in a (C + 1, H, W) probability map."""
        C = probs.shape[0] - 1
        boxes = np.zeros((C, 4), np.float32)
        valid = torch.zeros(C, dtype=torch.bool)
        for c in range(C):
            region = probable_region(probs[c + 1].numpy())
            if region is not None:
                boxes[c], valid[c] = mask_to_box(region), True
        pred = Prediction.empty(C, embedding.original_size)
        prompts = Prompts(torch.from_numpy(boxes), None, None, None, valid)
        self.decode(embedding, prompts, False, pred.logits, pred.iou)
        return Prediction(pred.logits, pred.iou, valid, prompts)
