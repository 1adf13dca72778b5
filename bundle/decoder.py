"""The prompt-to-mask step every source shares: prompts in, SAM's best mask per class out (encode once, decode many)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from bundle.alignment import probable_regions
from bundle.layout import components
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
        part_share: a class whose prompt mask has separate parts of at least this share of its largest part gets one
            prompt set per part (at most ``max_parts``), decoded separately and united: one box over two lungs makes
            SAM return one blob across the mediastinum. 0 or less: one prompt set per class.
        max_parts: at most this many parts per class.
    """

    def __init__(
        self,
        sam: SamBackend,
        prompter: PromptGenerator | None = None,
        refine: int = 0,
        refine_multimask: bool = False,
        part_share: float = 0.2,
        max_parts: int = 4,
    ):
        self.sam, self.prompter = sam, prompter or PromptGenerator()
        self.refine, self.refine_multimask = int(refine), bool(refine_multimask)
        self.part_share, self.max_parts = float(part_share), int(max_parts)

    def settings(self) -> dict[str, Any]:
        """What ``from_settings`` needs to rebuild this decoder around a SAM backend."""
        return {
            "prompter": self.prompter.settings(),
            "refine": self.refine,
            "refine_multimask": self.refine_multimask,
            "part_share": self.part_share,
            "max_parts": self.max_parts,
        }

    @classmethod
    def from_settings(cls, sam: SamBackend, settings: dict[str, Any]) -> "SamDecoder":
        return cls(
            sam,
            PromptGenerator(**settings["prompter"]),
            settings["refine"],
            settings["refine_multimask"],
            settings.get("part_share", 0.0),
            settings.get("max_parts", 1),
        )

    def split(self, probs: torch.Tensor, parts: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """(P, H, W) probabilities, one row per separate part of each class of (C, H, W) ``probs`` (each pixel to its
        nearest part), and the class of each row; a class in one part keeps its row unchanged. ``parts`` (C,): at
        most this many parts per class (its reference's count: a one-part class is never split); None: ``max_parts``."""
        rows, owner = [], []
        for c, p in enumerate(probs):
            limit = self.max_parts if parts is None else min(int(parts[c]), self.max_parts)
            found = []
            if self.part_share > 0 and limit > 1:
                found = components((p > self.prompter.threshold).numpy(), self.part_share)[:limit]
            if len(found) <= 1:
                rows.append(p)
                owner.append(c)
                continue
            index = np.zeros(p.shape, np.int32)
            for k, part in enumerate(found, start=1):
                index[part] = k
            nearest = ndimage.distance_transform_edt(index == 0, return_distances=False, return_indices=True)
            index = index[nearest[0], nearest[1]]
            for k in range(1, len(found) + 1):
                rows.append(p * torch.from_numpy(index == k).to(p))
                owner.append(c)
        return torch.stack(rows), owner

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

    def decode_parts(
        self,
        embedding: Embedding,
        probs: torch.Tensor,
        prototypes: torch.Tensor | None,
        multimask: bool,
        logits: torch.Tensor,
        iou: torch.Tensor,
        parts: Sequence[int] | None = None,
    ) -> Prompts:
        """``decode`` on prompts from (C, H, W) probabilities, one prompt set per part of each class (``split``);
        a class's parts are united (highest logit) and their predicted IoUs averaged. Returns the class-level
        prompts (one row per class, for pictures and ``found``)."""
        whole = self.prompter(self.sam, embedding, probs, prototypes)
        rows, owner = self.split(probs, parts)
        if len(owner) == probs.shape[0]:
            self.decode(embedding, whole, multimask, logits, iou)
            return whole
        prototypes_rows = None if prototypes is None else prototypes[owner]
        parts = self.prompter(self.sam, embedding, rows, prototypes_rows)
        self.decode_united(embedding, parts, owner, multimask, logits, iou)
        return whole

    def decode_united(
        self,
        embedding: Embedding,
        parts: Prompts,
        owner: list[int],
        multimask: bool,
        logits: torch.Tensor,
        iou: torch.Tensor,
    ) -> None:
        """``decode`` on one prompt row per part (``owner``: the class of each row); writes each class's parts united
        (highest logit) into ``logits`` (C, H, W) and their mean predicted IoU into ``iou``."""
        part_logits = torch.full((len(owner), *logits.shape[1:]), -20.0)
        part_iou = torch.zeros(len(owner))
        self.decode(embedding, parts, multimask, part_logits, part_iou)
        owner_t = torch.tensor(owner, dtype=torch.long)
        for c in range(logits.shape[0]):
            mine = (owner_t == c) & parts.valid
            if mine.any():
                logits[c], iou[c] = part_logits[mine].amax(0), part_iou[mine].mean()

    @torch.no_grad()
    def segment(
        self,
        embedding: Embedding,
        probs: torch.Tensor,
        prototypes: torch.Tensor | None = None,
        parts: Sequence[int] | None = None,
    ) -> Prediction:
        """SAM on prompts from (C, H, W) probabilities, then ``refine`` passes; classes without a mask stay empty.
        ``parts`` (C,): the most separate parts each class is prompted as (``split``)."""
        pred = Prediction.empty(probs.shape[0], embedding.original_size)
        first = self.decode_parts(embedding, probs, prototypes, False, pred.logits, pred.iou, parts)
        found = first.valid.clone()
        for _ in range(self.refine if found.any() else 0):
            # SAM's answer, binarised, becomes the next mask prompt and box (raw SAM logits as a mask prompt
            # make LiteMedSAM drift: measured in docs/benchmarks.md)
            self.decode_parts(
                embedding, (pred.logits > 0).float(), prototypes, self.refine_multimask, pred.logits, pred.iou, parts
            )
        return Prediction(pred.logits, pred.iou, found, first)

    def box_pass(self, embedding: Embedding, pred: Prediction) -> None:
        """Second pass in place: the box of each found class's first mask, multimask, best predicted IoU."""
        box, valid = masks_to_boxes((pred.logits > 0).numpy())
        valid &= pred.found
        if valid.any():
            self.decode(embedding, Prompts(box, None, None, None, valid), True, pred.logits, pred.iou)

    @torch.no_grad()
    def from_regions(self, embedding: Embedding, probs: torch.Tensor, parts: Sequence[int] | None = None) -> Prediction:
        """SAM on the box of the most probable connected region of each class in a (C + 1, H, W) probability map;
        ``parts`` (C,): a class in k separate parts (its reference's) is prompted with a box on each of its k most
        probable regions, their masks united (highest logit) and their predicted IoUs averaged."""
        C = probs.shape[0] - 1
        pred = Prediction.empty(C, embedding.original_size)
        boxes, owner = [], []
        for c in range(C):
            count = 1 if parts is None else int(parts[c])
            for region in probable_regions(probs[c + 1].numpy(), count):
                boxes.append(mask_to_box(region))
                owner.append(c)
        owner_t = torch.tensor(owner, dtype=torch.long)
        valid = torch.zeros(C, dtype=torch.bool)
        valid[owner_t] = True
        box = np.zeros((C, 4), np.float32)
        for c in range(C):  # the class-level prompt (for pictures): its most probable region's box
            if valid[c]:
                box[c] = boxes[owner.index(c)]
        prompts = Prompts(torch.from_numpy(box), None, None, None, valid)
        if len(owner) == int(valid.sum()):  # one region per class
            self.decode(embedding, prompts, False, pred.logits, pred.iou)
            return Prediction(pred.logits, pred.iou, valid, prompts)
        rows = Prompts(torch.from_numpy(np.stack(boxes)), None, None, None, torch.ones(len(owner), dtype=torch.bool))
        self.decode_united(embedding, rows, owner, False, pred.logits, pred.iou)
        return Prediction(pred.logits, pred.iou, valid, prompts)
