"""What a source returns for one image: per-class SAM logits, SAM's confidence and whether each class was found."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bundle.layout import on_other_classes
from bundle.prompts import Prompts

__all__ = ["Prediction", "combine", "dice", "own_places"]


@dataclass
class Prediction:
    """Per-class logits (C, H, W) for one image, positive = inside; ``iou`` (C,) is SAM's estimate per class.

    ``found`` (C,) is False for a class no prompt could be made for (it is then empty, never guessed).
    """

    logits: torch.Tensor
    iou: torch.Tensor
    found: torch.Tensor = field(default=None)  # type: ignore[assignment]
    prompts: Prompts | None = None  # the first-pass prompts, kept for pictures
    support: torch.Tensor | None = None  # (C,) how much the locator backs each class's mask (``candidates.support``)
    sources: list[str] | None = None  # per class, the source that served it in this image (a fusing source's choice)

    def __post_init__(self):
        if self.found is None:
            self.found = (self.logits > 0).flatten(1).any(1)

    @classmethod
    def empty(cls, num_classes: int, size: tuple[int, int]) -> "Prediction":
        """Nothing found: logits -20 everywhere."""
        return cls(
            torch.full((num_classes, *size), -20.0), torch.zeros(num_classes), torch.zeros(num_classes, dtype=bool)
        )

    def label(self) -> np.ndarray:
        """(H, W) label map with classes 1..C; background where every logit is negative."""
        best, idx = self.logits.max(0)
        return np.where(best.numpy() > 0, idx.numpy() + 1, 0).astype(np.int64)

    def masks(self) -> np.ndarray:
        """(C, H, W) boolean masks of the label map."""
        lab = self.label()
        return np.stack([lab == c + 1 for c in range(self.logits.shape[0])])


def combine(pick: torch.Tensor, a: Prediction, b: Prediction) -> Prediction:
    """Per class, ``a`` where ``pick`` (C,) holds, else ``b``."""
    return Prediction(
        torch.where(pick[:, None, None], a.logits, b.logits),
        torch.where(pick, a.iou, b.iou),
        torch.where(pick, a.found, b.found),
        Prompts.choose(pick, a.prompts, b.prompts),
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def own_places(switch: torch.Tensor, incoming: Prediction, kept: Prediction) -> torch.Tensor:
    """``switch`` (C,) less the classes whose ``incoming`` mask (logits above 0) lies mostly on another class's mask of
    ``kept``: with look-alike classes (the two lungs) that is the other class found again, not this one."""
    if len(switch) < 2 or not switch.any():
        return switch
    return switch & ~torch.from_numpy(on_other_classes((incoming.logits > 0).numpy(), kept.masks()))
