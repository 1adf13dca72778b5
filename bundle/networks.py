"""Warping network: a shared 2D encoder and a coarse-to-fine decoder (affine, then residual displacements).

Follows the NICE-Trans idea in 2D (SPEC 2.1.1): the coarsest level predicts an affine transform, every finer
level adds a residual displacement to the upsampled coarser field after warping the moving features with it.
Displacements are in pixels of the level they live on, channel order (row, column), as MONAI's ``Warp`` wants.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, Warp

from bundle.console import quiet

__all__ = ["WarpNet", "affine_to_ddf"]


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by LeakyReLU(0.2) and instance norm."""
    act = ("leakyrelu", {"negative_slope": 0.2})
    return nn.Sequential(
        Convolution(2, in_ch, out_ch, kernel_size=3, act=act, norm="instance", adn_ordering="AN"),
        Convolution(2, out_ch, out_ch, kernel_size=3, act=act, norm="instance", adn_ordering="AN"),
    )


def affine_to_ddf(theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Dense displacement (B, 2, H, W) in pixels for 2x3 affines acting on centred pixel coordinates (row, col)."""
    h, w = int(size[0]), int(size[1])
    rows = torch.arange(h, dtype=theta.dtype, device=theta.device) - (h - 1) / 2
    cols = torch.arange(w, dtype=theta.dtype, device=theta.device) - (w - 1) / 2
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), 0).reshape(2, -1)  # (2, HW)
    mapped = torch.einsum("bij,jn->bin", theta[:, :, :2], grid) + theta[:, :, 2:]
    return (mapped - grid).reshape(-1, 2, h, w)


class WarpNet(nn.Module):
    """Registration network mapping (moving, fixed) images of shape (B, C, H, W) to a displacement field.

    It is called either with two images, ``net(moving, fixed)``, or with one tensor holding both along the
    channels, ``net(torch.cat([moving, fixed], 1))`` (the bundle's one-input form: ``verify_net_in_out``,
    TorchScript export): with ``in_channels`` C, channels [0, C) are the moving (reference) image and [C, 2C)
    the fixed (target) image.

    Args:
        in_channels: channels of each input image.
        channels: encoder channels per level, finest first; the input size must be divisible by 2**(levels-1).
        hidden: width of the affine head's MLP.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (8, 16, 32, 64, 128), hidden: int = 64):
        super().__init__()
        self.in_channels = in_channels
        self.channels = tuple(channels)
        self.hidden = hidden
        self.encoder = nn.ModuleList()
        prev = in_channels
        for ch in self.channels:
            self.encoder.append(_conv_block(prev, ch))
            prev = ch
        top = self.channels[-1]
        self.affine_head = nn.Sequential(
            _conv_block(2 * top, top), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(top, hidden), nn.LeakyReLU(0.2)
        )
        self.affine_out = nn.Linear(hidden, 6)
        nn.init.zeros_(self.affine_out.weight)
        nn.init.zeros_(self.affine_out.bias)
        self.refine = nn.ModuleList()
        self.flow_out = nn.ModuleList()
        for ch in reversed(self.channels[:-1]):
            self.refine.append(_conv_block(2 * ch + 2, ch))
            head = nn.Conv2d(ch, 2, kernel_size=3, padding=1)
            nn.init.normal_(head.weight, 0.0, 1e-5)
            nn.init.zeros_(head.bias)
            self.flow_out.append(head)
        with quiet("monai.networks.blocks.Warp: Using PyTorch native"):  # the expected path without MONAI's C++ ops
            self.warp = Warp(mode="bilinear", padding_mode="zeros")
        self.register_buffer("identity", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), persistent=False)

    def config(self) -> dict:
        """Constructor arguments: ``WarpNet(**net.config())`` builds the same architecture."""
        return {"in_channels": self.in_channels, "channels": list(self.channels), "hidden": self.hidden}

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = F.avg_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Return the displacement field (B, 2, H, W) in pixels that warps ``moving`` onto ``fixed``.

        A single moving image (batch 1) is encoded once and shared by all B fixed images. Without ``fixed``,
        ``moving`` is the (B, 2 * in_channels, H, W) pair: moving channels first, then fixed.
        """
        if fixed is None:
            if moving.shape[1] != 2 * self.in_channels:
                raise ValueError(
                    f"a single input needs 2 x {self.in_channels} channels (moving, fixed), got {moving.shape[1]}"
                )
            moving, fixed = moving[:, : self.in_channels], moving[:, self.in_channels :]
        fix_feats = self.encode(fixed)
        mov_feats = [m.expand(fixed.shape[0], -1, -1, -1) for m in self.encode(moving)]
        top_m, top_f = mov_feats[-1], fix_feats[-1]
        params = self.affine_out(self.affine_head(torch.cat([top_m, top_f], 1)))
        theta = self.identity + params.view(-1, 2, 3)
        ddf = affine_to_ddf(theta, top_f.shape[2:])
        for i, level in enumerate(range(len(self.channels) - 2, -1, -1)):
            ddf = 2.0 * F.interpolate(ddf, scale_factor=2, mode="bilinear", align_corners=True)
            warped = self.warp(mov_feats[level], ddf)
            x = self.refine[i](torch.cat([warped, fix_feats[level], ddf], 1))
            ddf = ddf + self.flow_out[i](x)
        return ddf

    def warp_image(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Warp ``image`` (B, C, H, W) with ``ddf`` (bilinear, zeros outside)."""
        return self.warp(image, ddf)
