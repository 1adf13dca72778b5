"""A per-cohort patch classifier on frozen encoder features: learned prototypes for the fused strategy.

Trained at test time on the reference (and augmented copies of it), then on SAM's answers for the targets weighted
by SAM's confidence (self-training). Its class-probability map says where each structure is in a target, wherever
it sits, which is what warping cannot say when anatomy moves.
"""

from __future__ import annotations

import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Affine

from bundle.distributed import average_gradients, broadcast_module

__all__ = ["PatchClassifier", "reference_views"]


# (scale, rotation in degrees, horizontal mirror) of the reference's augmented views, in the order of their store slots
REFERENCE_VIEWS = [(0.6, 0, False), (0.8, 20, False), (1.25, -20, False), (1.6, 0, False), (1.0, 0, True)]


def reference_views(
    image: np.ndarray, label: np.ndarray, views: list[tuple[float, float, bool]] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Scaled / rotated / mirrored copies of the reference (image (H, W[, 3]), label (H, W)).

    ``views`` holds (scale, rotation in degrees, horizontal flip) triples; the default spans 0.6-1.6x, +-90 deg.
    """
    views = views or REFERENCE_VIEWS
    img = torch.from_numpy(np.asarray(image, dtype=np.float32))
    img = img.permute(2, 0, 1) if img.ndim == 3 else img[None]
    lab = torch.from_numpy(np.asarray(label, dtype=np.float32))[None]
    out = []
    for scale, degrees, flip in views:
        # Affine's scale_params shrink the content for values > 1; the inverse keeps "scale" meaning zoom
        affine = Affine(
            rotate_params=np.deg2rad(degrees), scale_params=(1 / scale, 1 / scale), padding_mode="reflection"
        )
        im = affine(img, mode="bilinear")[0]
        lb = affine(lab, mode="nearest", padding_mode="zeros")[0]
        im, lb = np.asarray(im), np.asarray(lb)[0]
        if flip:
            im, lb = im[..., ::-1], lb[:, ::-1]
        im = im.transpose(1, 2, 0) if im.shape[0] == 3 else im[0]
        out.append((np.ascontiguousarray(im), np.ascontiguousarray(np.rint(lb).astype(np.int64))))
    return out


class PatchClassifier:
    """Softmax over background + C classes from (D, h, w) features, a two-layer 1x1-conv head.

    Args:
        hidden: hidden channels.
        iterations: optimisation steps per fit.
        pixels_per_map: patches sampled from each feature map (half from labelled structures where present).
        lr, weight_decay: AdamW settings.
        seed: makes the sampling and initialisation repeatable.
    """

    def __init__(
        self,
        hidden: int = 64,
        iterations: int = 300,
        pixels_per_map: int = 1024,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ):
        self.hidden, self.iterations, self.pixels_per_map = hidden, iterations, pixels_per_map
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.head: torch.nn.Module | None = None
        self.parts: list[int] | None = None  # per class, its separate parts in the reference (set by its source)

    def _new_head(self, in_features: int, num_classes: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(in_features, self.hidden), torch.nn.GELU(), torch.nn.Linear(self.hidden, num_classes + 1)
        )

    def state_dict(self) -> dict:
        """The trained head and its shape, for saving with ``torch.save`` (see ``bundle.adapted``)."""
        if self.head is None:
            raise RuntimeError("PatchClassifier.fit must run before its state can be saved")
        first, last = self.head[0], self.head[-1]
        return {
            "in_features": int(first.in_features),
            "hidden": int(first.out_features),
            "num_classes": int(last.out_features) - 1,
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
        }

    def load_state_dict(self, state: dict) -> "PatchClassifier":
        """Restore a head saved by ``state_dict`` (no training)."""
        self.hidden = int(state["hidden"])
        head = self._new_head(int(state["in_features"]), int(state["num_classes"]))
        head.load_state_dict(state["head"], strict=True)
        self.head = head.eval()
        return self

    def _pick(self, soft: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Flat indices (n,) of ``pixels_per_map`` pixels of a (C + 1, h, w) label map, half of them inside labelled
        structures where there are any."""
        y = soft.reshape(soft.shape[0], -1)
        n = min(self.pixels_per_map, y.shape[1])
        inside = torch.nonzero(y[1:].sum(0) > 0.5)[:, 0]
        k = min(len(inside), n // 2)
        return torch.cat(
            [inside[torch.randperm(len(inside), generator=gen)[:k]], torch.randperm(y.shape[1], generator=gen)[: n - k]]
        )

    def picks(self, softs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pixels ``fit`` samples from each of these (C + 1, h, w) label maps given in this order: flat indices
        (n,) per map. Sampling them ahead lets a caller keep a few pixels per image instead of its feature map."""
        gen = torch.Generator().manual_seed(self.seed)
        return [self._pick(soft.float().cpu(), gen) for soft in softs]

    def fit(self, samples: list[tuple[torch.Tensor, torch.Tensor, float]], num_classes: int) -> "PatchClassifier":
        """Train from (features (D, h, w), one-hot soft labels (C + 1, h, w), weight) triples, whose pixels are sampled
        here, followed by any (features (n, D), soft labels (n, C + 1), weight) triples sampled ahead at ``picks``
        (samples of weight 0 are left out and draw nothing)."""
        gen = torch.Generator().manual_seed(self.seed)
        xs, ys, ws = [], [], []
        for feats, soft, weight in samples:
            if weight <= 0:
                continue
            feats, soft = feats.float().cpu(), soft.float().cpu()
            if feats.ndim == 3:
                pick = self._pick(soft, gen)
                feats, soft = feats.reshape(feats.shape[0], -1).T[pick], soft.reshape(soft.shape[0], -1).T[pick]
            xs.append(feats)
            ys.append(soft)
            ws.append(torch.full((len(feats),), float(weight)))
        x, y, w = torch.cat(xs), torch.cat(ys), torch.cat(ws)
        torch.manual_seed(self.seed)
        head = self._new_head(x.shape[1], num_classes)
        broadcast_module(head)
        # rarer classes weigh more (square root of the inverse frequency, at most x20)
        freq = (y * w[:, None]).sum(0)
        class_w = (freq.sum() / freq.clamp_min(1e-6)).clamp(1, 400).sqrt()
        total = w.sum()
        # several processes: each takes its share of the samples, the gradients are summed (the same full-batch step)
        rank, size = idist.get_rank(), idist.get_world_size()
        x, y, w = x[rank::size], y[rank::size], w[rank::size]
        opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        with torch.enable_grad():
            for _ in range(self.iterations):
                opt.zero_grad()
                logp = F.log_softmax(head(x), dim=1)
                loss = -((y * logp * class_w).sum(1) * w).sum() / total
                loss.backward()
                average_gradients(head)
                opt.step()
        self.head = head.eval()
        return self

    @torch.no_grad()
    def __call__(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Class probabilities (C + 1, H, W) in the image frame from (D, h, w) features."""
        if self.head is None:
            raise RuntimeError("PatchClassifier.fit must run before prediction")
        D, h, w = feats.shape
        p = torch.softmax(self.head(feats.float().cpu().reshape(D, -1).T), dim=1).T.reshape(-1, h, w)
        return self.upsample(p, size)

    @staticmethod
    def upsample(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(C + 1, h, w) probabilities on the feature grid -> (C + 1, H, W) in the image frame (bilinear)."""
        if tuple(probs.shape[-2:]) == tuple(size):
            return probs
        return F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
