"""Transforms: working-frame resizing and the reference augmentation used by the augmentation loss."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandZoomd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)

__all__ = [
    "reference_augmentation",
    "normalize_intensity",
    "scale_intensity",
    "shrink",
    "resize_label",
    "to_working",
    "from_working",
    "one_hot",
]


def reference_augmentation(size: int, rotate_deg: float = 10.0, translate: float = 0.1, shear_deg: float = 10.0):
    """Random affine (rotation, translation, scale 0.9-1.1, shear), crop-like zoom and intensity jitter.

    Operates on a dict with ``image`` (1, S, S) and ``label`` (K, S, S, one-hot).
    """
    rot, shear = math.radians(rotate_deg), math.tan(math.radians(shear_deg))
    return Compose(
        [
            RandAffined(
                keys=("image", "label"),
                prob=1.0,
                rotate_range=rot,
                translate_range=(translate * size, translate * size),
                scale_range=(0.1, 0.1),
                shear_range=(shear, shear),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandZoomd(keys=("image", "label"), prob=0.3, min_zoom=1.0, max_zoom=1.15, mode=("bilinear", "nearest")),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5)),
            RandScaleIntensityd(keys="image", prob=0.3, factors=0.1),
            RandGaussianNoised(keys="image", prob=0.3, std=0.02),
        ]
    )


def normalize_intensity(image: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Grayscale float image in [0, 1] with percentile clipping (colour images are averaged first)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(-1)
    lo, hi = np.percentile(img, [lower, upper])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def scale_intensity(
    image: np.ndarray, window: tuple[float, float] | None = None, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Display range of a raw image (or a whole volume), mapped to [0, 255] float32.

    ``window`` = (level, width), e.g. (40, 400) for CT soft tissue, clips to level +- width / 2. Otherwise images
    already in an 8-bit display range (integers within 0-255) are kept as they are, and any other range (CT in
    Hounsfield units, 16-bit X-ray, MRI) is clipped at ``percentiles`` so a few extreme pixels do not flatten the
    contrast.
    """
    img = np.asarray(image, dtype=np.float32)
    if window is not None:
        level, width = float(window[0]), float(window[1])
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
        return ScaleIntensityRange(level - width / 2, level + width / 2, 0.0, 255.0, clip=True)(img).numpy()
    finite = img[np.isfinite(img)]
    if finite.size and finite.min() >= 0 and finite.max() <= 255 and np.all(finite == np.round(finite)):
        return img
    return ScaleIntensityRangePercentiles(percentiles[0], percentiles[1], 0.0, 255.0, clip=True)(img).numpy()


def shrink(image: np.ndarray, max_size: int, nearest: bool = False) -> np.ndarray:
    """Resize so the long side is at most ``max_size`` (area averaging, or nearest for labels)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_size:
        return image
    s = max_size / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if nearest:
        return cv2.resize(image.astype(np.int32), size, interpolation=cv2.INTER_NEAREST).astype(image.dtype)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) label map to ``size`` (H, W)."""
    return cv2.resize(label.astype(np.int32), (size[1], size[0]), interpolation=cv2.INTER_NEAREST).astype(label.dtype)


def working_shape(size: tuple[int, int], working: int) -> tuple[int, int]:
    s = working / max(size)
    return max(1, int(round(size[0] * s))), max(1, int(round(size[1] * s)))


def to_working(x: torch.Tensor, working: int, mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) -> (C, S, S): longest side resized to S, padded bottom/right with zeros."""
    h, w = working_shape(tuple(x.shape[-2:]), working)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    y = F.interpolate(x[None].float(), size=(h, w), mode=mode, **kwargs)[0]
    return F.pad(y, (0, working - w, 0, working - h))


def from_working(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, S, S) -> (C, H, W): crop the padded frame and resize to the image size."""
    h, w = working_shape(size, x.shape[-1])
    return F.interpolate(x[None, :, :h, :w].float(), size=size, mode="bilinear", align_corners=False)[0]


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., H, W) integer label -> (K, ..., H, W) float one-hot, K = num_classes + 1 (background first)."""
    return F.one_hot(label.long().clamp(0, num_classes), num_classes + 1).movedim(-1, 0).float()
