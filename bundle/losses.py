"""Losses for test-time training of the warping network (SPEC 2.1.2), built from MONAI losses."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss, SSIMLoss

from bundle.console import quiet

__all__ = ["WarpingLoss", "LabelLoss"]


class WarpingLoss(torch.nn.Module):
    """Image similarity between warped moving and fixed images plus ``lambda_reg`` x flow smoothness.

    Args:
        similarity: ``"lncc"`` (robust to black padding), ``"ssim"`` or ``"both"``.
        lambda_reg: weight of the diffusion regulariser (L2 of the displacement gradient, in pixels).
        lncc_kernel: LNCC window; ssim_window: SSIM window.
    """

    def __init__(self, similarity: str = "lncc", lambda_reg: float = 0.6, lncc_kernel: int = 9, ssim_window: int = 7):
        super().__init__()
        if similarity not in ("lncc", "ssim", "both"):
            raise ValueError(f"similarity must be 'lncc', 'ssim' or 'both', got {similarity!r}")
        self.terms = torch.nn.ModuleList()
        if similarity in ("lncc", "both"):
            self.terms.append(LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=lncc_kernel))
        if similarity in ("ssim", "both"):
            self.terms.append(SSIMLoss(spatial_dims=2, data_range=1.0, win_size=ssim_window))
        self.smooth = DiffusionLoss()
        self.lambda_reg = lambda_reg

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        sim = sum(term(warped, fixed) for term in self.terms)
        with quiet("Using a non-tuple sequence for multidimensional indexing"):  # inside MONAI's DiffusionLoss
            smooth = self.smooth(ddf)
        return sim + self.lambda_reg * smooth


class LabelLoss(torch.nn.Module):
    """DiceCE between a warped soft one-hot label and a target label (augmented reference or SAM pseudo-label).

    Both inputs are (B, K, H, W) with background as channel 0; ``weight`` (B,) scales each sample
    (e.g. SAM's predicted IoU for pseudo-labels).
    """

    def __init__(self):
        super().__init__()
        self.dice_ce = DiceCELoss(softmax=True)

    def forward(self, warped: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        # the warped label is already a probability map: its log is a logit whose softmax gives it back
        logp = torch.log(warped.clamp_min(1e-6))
        if weight is None:
            return self.dice_ce(logp, target)
        losses = torch.stack([self.dice_ce(logp[i : i + 1], target[i : i + 1]) for i in range(len(logp))])
        return (losses * weight).sum() / weight.sum().clamp_min(1e-6)
