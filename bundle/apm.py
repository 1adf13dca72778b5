"""Auto-prompting: a small network on the frozen encoder's multi-level features places each class's prompts.

``AutoPrompter`` reads the encoder's stage outputs (``Embedding.levels``, pooled to one grid), reduces them with
convolutions and gives, per class, a centre heat map and a size map (the box: the soft-argmax of the heat map, and the
size read where the heat is) and, optionally, point heat maps (one soft-argmax point each). Being convolutional with
soft-argmax outputs, it follows a structure that moves. ``fit_prompter`` trains it at test time on labelled views:
L1 on the box (centre and log size), and, with points, Dice + BCE of SAM's mask decoded from the predicted prompts
(SAM frozen; gradients reach the points through its prompt encoder).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from bundle.prompts import masks_to_boxes
from bundle.sam import Embedding, SamBackend
from bundle.transforms import one_hot

__all__ = ["AutoPrompter", "box_targets", "fit_prompter", "unit_to_pixels"]


class AutoPrompter(torch.nn.Module):
    """(1, L, G, G) multi-level features -> per class a box and ``num_points`` points in [0, 1] of SAM's input frame.

    Args:
        in_channels: channels of the stacked levels.
        num_classes: classes (the reference's, without background).
        num_points: positive points per class (0: box only).
        width: channels of the convolutional body.
    """

    def __init__(self, in_channels: int, num_classes: int, num_points: int = 0, width: int = 64):
        super().__init__()
        self.in_channels, self.num_classes, self.num_points, self.width = in_channels, num_classes, num_points, width

        def block(cin: int, dilation: int) -> list[torch.nn.Module]:
            return [
                torch.nn.Conv2d(cin, width, 3, padding=dilation, dilation=dilation),
                torch.nn.GroupNorm(8, width),
                torch.nn.GELU(),
            ]

        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 1), torch.nn.GroupNorm(8, width), torch.nn.GELU(),
            *block(width, 1), *block(width, 2), *block(width, 4),
        )  # fmt: skip
        self.head = torch.nn.Conv2d(width, num_classes * (3 + num_points), 1)
        self.temperature = torch.nn.Parameter(torch.tensor(2.3))  # log scale of the heat maps (x10 at start)

    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "num_points": self.num_points,
            "width": self.width,
        }

    def forward(self, levels: torch.Tensor, heat: bool = False):
        """(B, L, G, G) -> boxes (B, C, 4) as (cx, cy, log w, log h) in the unit frame, points (B, C, P, 2) as (x, y);
        a batch of one gives (C, 4) and (C, P, 2). With ``heat``, also the centre heat (B, C, G * G), summing to 1."""
        out = self.head(self.body(levels.float()))  # (B, C * (3 + P), G, G)
        B, C, P, G = out.shape[0], self.num_classes, self.num_points, out.shape[-1]
        out = out.view(B, C, 3 + P, G, G)
        grid = (torch.arange(G, dtype=out.dtype, device=out.device) + 0.5) / G
        gy, gx = torch.meshgrid(grid, grid, indexing="ij")

        def soft_argmax(heat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w = torch.softmax(heat.flatten(-2) * self.temperature.exp(), dim=-1)  # (..., G * G)
            xy = torch.stack([(w * gx.flatten()).sum(-1), (w * gy.flatten()).sum(-1)], dim=-1)
            return xy, w

        centre, weights = soft_argmax(out[:, :, 0])
        size = (weights[:, :, None] * out[:, :, 1:3].flatten(-2)).sum(-1)  # log (w, h), read where the centre is
        boxes = torch.cat([centre, size], dim=-1)
        points = soft_argmax(out[:, :, 3:])[0] if P else out.new_zeros(B, C, 0, 2)
        if heat:
            return boxes, points, weights
        return (boxes[0], points[0]) if B == 1 else (boxes, points)


def shift_levels(levels: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(B, L, G, G) features rolled by (dx, dy) grid cells (what leaves one side comes in at the other, so no
    artificial edge marks the move)."""
    return torch.roll(levels, shifts=(dy, dx), dims=(-2, -1))


def box_targets(masks: torch.Tensor, embedding: Embedding) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) bool masks -> (C, 4) (cx, cy, log w, log h) in the unit frame of SAM's input, and (C,) present."""
    boxes, valid = masks_to_boxes(masks.numpy().astype(bool))
    x0, y0, x1, y1 = (boxes.float() / max(embedding.original_size)).unbind(-1)  # the longer side spans the frame
    size = torch.stack([(x1 - x0).clamp_min(1e-3), (y1 - y0).clamp_min(1e-3)], dim=-1).log()
    return torch.cat([torch.stack([(x0 + x1) / 2, (y0 + y1) / 2], dim=-1), size], dim=-1), valid


def unit_to_pixels(
    boxes: torch.Tensor, points: torch.Tensor, embedding: Embedding
) -> tuple[torch.Tensor, torch.Tensor]:
    """``AutoPrompter`` outputs -> boxes (C, 4) as (x0, y0, x1, y1) and points (C, P, 2) in image pixels."""
    s = max(embedding.original_size)
    centre, half = boxes[:, :2], boxes[:, 2:].exp() / 2
    return torch.cat([centre - half, centre + half], dim=-1) * s, points * s


def fit_prompter(
    prompter: AutoPrompter,
    sam: SamBackend,
    views: Sequence[tuple[Embedding, np.ndarray, float]],
    steps: int = 300,
    lr: float = 3e-3,
    seed: int = 0,
    mask_steps: int = 0,
    max_shift: int = 8,
) -> tuple[AutoPrompter, dict]:
    """Train ``prompter`` on (embedding with levels, (H, W) class-index label, weight) views; SAM is not changed.

    Every step: L1 on every view's boxes (centre and log size; classes absent from a view do not count), all views
    moved together by up to 1 / ``max_shift`` of the frame. The last
    ``mask_steps`` steps (with points) also decode one view's classes from the predicted box and points and add
    Dice + BCE of SAM's mask against the truth. Returns the prompter (eval mode) and a log.
    """
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    C = prompter.num_classes
    data = []
    for embedding, label, weight in views:
        if weight <= 0 or embedding.levels is None:
            continue
        masks = one_hot(torch.from_numpy(np.asarray(label)), C)[1:]
        target, present = box_targets(masks, embedding)
        data.append(
            (
                embedding,
                masks,
                target,
                present.float() * float(weight),
                _grid(masks, embedding, embedding.levels.shape[-1]),
            )
        )
    if not data:
        return prompter.eval(), {"steps": 0, "seconds": 0.0}
    device = data[0][0].levels.device
    prompter.to(device)
    optimizer = torch.optim.AdamW(prompter.parameters(), lr=lr, weight_decay=1e-4)
    seg_loss = DiceCELoss(sigmoid=True)
    levels = torch.cat([e.levels for e, *_ in data]).float()
    targets = torch.stack([d[2] for d in data]).to(device)  # (V, C, 4)
    weights = torch.stack([d[3] for d in data]).to(device)  # (V, C)
    G = levels.shape[-1]
    occupancy = torch.stack([d[4] for d in data]).to(device)  # (V, C, G, G): share of each cell inside the class
    first = last = float("nan")
    prompter.train()
    with torch.enable_grad():
        for step in range(int(steps)):
            # every view moved by a random whole number of grid cells (its box with it): the prompter must find a
            # structure by what it looks like, not by where the reference had it
            dx, dy = (int(v) for v in torch.randint(-G // max_shift, G // max_shift + 1, (2,), generator=generator))
            moved = targets.clone()
            moved[..., 0] = (moved[..., 0] + dx / G) % 1.0
            moved[..., 1] = (moved[..., 1] + dy / G) % 1.0
            # a box split by the wrap has no single centre: those classes sit this step out
            half = targets[..., 2:].exp() / 2
            inside = ((moved[..., :2] - half > 0) & (moved[..., :2] + half < 1)).all(-1).float()
            boxes, _, heat = prompter(shift_levels(levels, dx, dy), heat=True)
            w = weights * inside
            # the centre's heat on the structure itself (most of the mass inside it), then the box
            mass = (heat * shift_levels(occupancy, dx, dy).flatten(-2)).sum(-1)
            loss = ((boxes - moved).abs().sum(-1) - (mass + 1e-4).log()) * w
            loss = loss.sum() / w.sum().clamp_min(1e-6)
            if prompter.num_points and step >= steps - mask_steps:
                v = int(torch.randint(len(data), (1,), generator=generator))
                loss = loss + _mask_loss(prompter, sam, data[v], seg_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            first = float(loss.detach()) if step == 0 else first
            last = float(loss.detach())
    return prompter.eval(), {
        "steps": int(steps),
        "first_loss": first,
        "last_loss": last,
        "seconds": time.time() - start,
    }


def _grid(masks: torch.Tensor, embedding: Embedding, size: int = 32) -> torch.Tensor:
    """(C, H, W) masks -> (C, size, size) share of each cell of the unit frame (longer side spans it) inside them."""
    H, W = embedding.original_size
    side = max(H, W)
    x = F.pad(masks[:, None].float(), (0, side - W, 0, side - H))
    return F.adaptive_avg_pool2d(x, size)[:, 0]


def _mask_loss(prompter: AutoPrompter, sam: SamBackend, view: tuple, loss_fn: torch.nn.Module) -> torch.Tensor:
    """Dice + BCE of SAM's low-res masks decoded from the predicted box and points of the classes in ``view``."""
    embedding, masks, _, weight, _ = view
    keep = weight > 0
    boxes, points = prompter(embedding.levels)
    boxes, points = unit_to_pixels(boxes, points, embedding)
    labels = torch.ones(points.shape[:2], dtype=torch.int64)
    sparse, dense = sam.encode_prompts(embedding, boxes[keep], points[keep], labels[keep])
    low_res, _ = sam.decode_low_res(embedding, sparse, dense)
    s = sam.img_size / max(embedding.original_size)
    h, w = int(round(embedding.original_size[0] * s)), int(round(embedding.original_size[1] * s))
    target = F.interpolate(masks[keep][:, None].float(), size=(h, w), mode="area")
    target = F.pad(target, (0, sam.img_size - w, 0, sam.img_size - h))
    target = F.interpolate(target, size=low_res.shape[-2:], mode="area").to(low_res)
    return loss_fn(low_res, target)
