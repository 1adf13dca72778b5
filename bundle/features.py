"""Frozen patch-feature encoders for matching: the SAM image encoder (default) or a DINOv2 checkpoint on disk.

An encoder maps an image to L2-normalised patch features (D, h, w) covering the image (the padding a backend adds
is cut off), so patch (i, j) sits at pixel ((j + 0.5) * W / w, (i + 0.5) * H / h).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from bundle.sam import Embedding

__all__ = ["sam_patch_features", "Dinov2Features"]


def sam_patch_features(embedding: Embedding, img_size: int) -> torch.Tensor:
    """L2-normalised SAM encoder features over the part of the padded frame the image occupies: (D, h, w)."""
    feats = embedding.features[0]
    grid = feats.shape[-1]
    h = max(1, int(round(embedding.input_size[0] * grid / img_size)))
    w = max(1, int(round(embedding.input_size[1] * grid / img_size)))
    return F.normalize(feats[:, :h, :w].float(), dim=0)


class Dinov2Features(torch.nn.Module):
    """DINOv2 patch tokens from a local checkpoint through a ``timm`` architecture (no download).

    Args:
        checkpoint: a state dict for ``arch`` (e.g. DINOv2 ViT-S/14 weights saved with ``torch.save``).
        arch: a timm DINOv2 architecture name.
        img_size: long side of the encoder input, a multiple of the patch size.
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        checkpoint: str,
        arch: str = "vit_small_patch14_dinov2",
        img_size: int = 448,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        import timm

        if not checkpoint or not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"DINOv2 checkpoint not found: {checkpoint!r} (no download at run time)")
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        self.model.load_state_dict(state, strict=True)
        self.model.eval().requires_grad_(False).to(device)
        self.patch = int(self.model.patch_embed.patch_size[0])
        self.img_size = img_size - img_size % self.patch
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) or (H, W, 3) image of any range -> (D, h, w) L2-normalised patch features."""
        img = np.asarray(image, dtype=np.float32)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
        x = torch.from_numpy(img[..., :3]).permute(2, 0, 1)[None].to(self.device)
        scale = self.img_size / max(img.shape[:2])
        h = max(self.patch, int(round(img.shape[0] * scale / self.patch)) * self.patch)
        w = max(self.patch, int(round(img.shape[1] * scale / self.patch)) * self.patch)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = (x - torch.tensor(self.mean, device=x.device)[:, None, None]) / torch.tensor(self.std, device=x.device)[
            :, None, None
        ]
        tokens = self.model.forward_features(x)[0, self.model.num_prefix_tokens :]
        return F.normalize(tokens.T.reshape(-1, h // self.patch, w // self.patch).float(), dim=0)
