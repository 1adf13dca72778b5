"""Incremental pattern shifting: a learned, image-conditioned shift of SAM's mask tokens; SAM stays frozen.

``PatternShift`` maps an image embedding to a (T, C) shift of the mask decoder's T mask tokens. Its last layer starts
at zero, so an untrained shift is SAM exactly. ``fit_shift`` trains it at test time with Dice + BCE on labelled
views (the reference and augmented copies of it), prompted as a source would prompt them: box and mask prompts from
a perturbed copy of the true mask (optionally, the box alone too).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from bundle.prompts import PromptGenerator
from bundle.sam import Embedding, SamBackend
from bundle.transforms import one_hot

__all__ = ["PatternShift", "fit_shift", "perturb", "shifted"]


class PatternShift(torch.nn.Module):
    """Global average pool of the embedding -> MLP -> (tokens, channels) shift of the mask tokens.

    Args:
        channels: embedding channels (256 for SAM's neck).
        tokens: mask tokens of the decoder (SAM: 4).
        hidden: hidden width of the MLP.
    """

    def __init__(self, channels: int = 256, tokens: int = 4, hidden: int = 1024):
        super().__init__()
        self.channels, self.tokens, self.hidden = int(channels), int(tokens), int(hidden)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(self.channels, self.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(self.hidden, self.tokens * self.channels),
        )
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)

    def config(self) -> dict:
        return {"channels": self.channels, "tokens": self.tokens, "hidden": self.hidden}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) image embedding -> (T, C) shift."""
        return self.mlp(features.mean(dim=(2, 3)))[0].view(self.tokens, self.channels)


def shifted(embedding: Embedding, shift: PatternShift | None) -> Embedding:
    """``embedding`` whose decoding adds ``shift``'s tokens (a copy; the cached embedding is left as it is)."""
    if shift is None:
        return embedding
    return dataclasses.replace(embedding, token_shift=shift(embedding.features))


def perturb(masks: torch.Tensor, generator: torch.Generator, move: float = 0.05, scale: float = 0.1) -> torch.Tensor:
    """(C, H, W) binary masks -> (C, H, W) soft masks, each moved by up to ``move`` of the image and rescaled by up
    to ``scale`` around its centre, then blurred: the imperfect masks a source's prompts come from."""
    C, H, W = masks.shape
    u = torch.rand(C, 3, generator=generator) * 2 - 1
    s = 1.0 + scale * u[:, 0]
    theta = torch.zeros(C, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / s, 1 / s
    theta[:, 0, 2], theta[:, 1, 2] = 2 * move * u[:, 1], 2 * move * u[:, 2]
    grid = F.affine_grid(theta, (C, 1, H, W), align_corners=False)
    out = F.grid_sample(masks[:, None].float(), grid, mode="bilinear", align_corners=False)
    k = max(3, 2 * (max(H, W) // 128) + 1)
    return F.avg_pool2d(out, k, stride=1, padding=k // 2, count_include_pad=False)[:, 0]


def _low_res_target(label: torch.Tensor, embedding: Embedding, sam: SamBackend) -> torch.Tensor:
    """(C, H, W) binary masks -> (C, 1, L, L) on the decoder's low-res grid (padding outside the image is 0)."""
    s = sam.low_res_size / max(embedding.original_size)
    h, w = int(round(embedding.original_size[0] * s)), int(round(embedding.original_size[1] * s))
    x = F.interpolate(label[:, None].float(), size=(h, w), mode="area")
    return F.pad(x, (0, sam.low_res_size - w, 0, sam.low_res_size - h))


def fit_shift(
    shift: PatternShift,
    sam: SamBackend,
    prompter: PromptGenerator,
    views: Sequence[tuple[Embedding, np.ndarray]],
    num_classes: int,
    steps: int = 60,
    lr: float = 1e-3,
    seed: int = 0,
    move: float = 0.05,
    scale: float = 0.1,
    box_only: bool = False,
    weights: Sequence[Sequence[float]] | None = None,
) -> tuple[PatternShift, dict]:
    """Train ``shift`` on labelled ``views`` ((embedding, (H, W) class-index label) pairs); SAM is not changed.

    Each step takes one view: every class present in it is decoded from box + mask prompts of a copy of its mask
    moved and rescaled by up to ``move`` / ``scale`` (``perturb``), every other step (``box_only``) from the box alone,
    and Dice + BCE against the true mask drives the shift, each class's term weighted by ``weights[view][class]``
    ((C,) per view, e.g. SAM's predicted IoU of a pseudo-label; None: 1). Returns the shift (eval mode)
    and a log (loss before / after, seconds).
    """
    start = time.time()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.Adam(shift.parameters(), lr=lr)
    data = []
    for i, (embedding, label) in enumerate(views):
        masks = one_hot(torch.from_numpy(np.asarray(label)), num_classes)[1:]
        weight = torch.ones(num_classes) if weights is None else torch.as_tensor(weights[i], dtype=torch.float32)
        present = masks.flatten(1).any(1) & (weight > 0)
        if present.any():
            data.append((embedding, masks[present], _low_res_target(masks[present], embedding, sam), weight[present]))
    if not data:
        return shift.eval(), {"steps": 0, "seconds": 0.0}
    first = last = float("nan")
    shift.train()
    with torch.enable_grad():
        for step in range(int(steps)):
            embedding, masks, target, weight = data[int(torch.randint(len(data), (1,), generator=generator))]
            prompts = prompter(sam, embedding, perturb(masks, generator, move, scale))
            keep = prompts.valid
            if not keep.any():
                continue
            e = shifted(embedding, shift)
            # the prompter's own prompts (box + mask, as the warp gives them), or every other step the box alone
            kwargs = {"boxes": prompts.boxes[keep]} if box_only and step % 2 else prompts.rows(keep)
            sparse, dense = _encode_prompts(sam, e, **kwargs)
            low_res, _ = sam.decode_low_res(e, sparse, dense)
            w = weight[keep]
            if bool((w == 1).all()):
                loss = loss_fn(low_res, target[keep])
            else:
                loss = sum(wi * loss_fn(low_res[j : j + 1], target[keep][j : j + 1]) for j, wi in enumerate(w)) / len(w)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            first = float(loss.detach()) if step == 0 else first
            last = float(loss.detach())
    return shift.eval(), {"steps": int(steps), "first_loss": first, "last_loss": last, "seconds": time.time() - start}


def _encode_prompts(sam: SamBackend, embedding: Embedding, **prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder on ``SamBackend.predict``'s prompt arguments (image pixels), without gradients."""
    with torch.no_grad():
        return sam.encode_prompts(embedding, **prompts)
