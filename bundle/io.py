"""Reading cases and writing label maps.

One orientation boundary: MONAI readers return 2D arrays as (x, y) = (column, row); everything inside the
bundle works in numpy's (row, column) = (H, W) order. ``to_hw`` and ``from_hw`` are the only crossings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, PILWriter
from monai.transforms import LoadImage

__all__ = [
    "Case",
    "InvalidReferenceError",
    "load_datalist",
    "read_image",
    "read_label",
    "to_hw",
    "from_hw",
    "save_label",
    "output_name",
    "to_class_index",
    "case_id",
]

_IMAGE_EXTS = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


class InvalidReferenceError(ValueError):
    """The reference image or label is unusable; raised before any work is done."""


@dataclass
class Case:
    """One image of the cohort: where it lives and, once read, its metadata."""

    id: str
    image_path: str
    label_path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def case_id(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    for ext in _IMAGE_EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def to_hw(array: Any) -> np.ndarray:
    """MONAI 2D image (x, y[, c]) or (1, x, y) or (x, y, 1) -> numpy (H, W[, C])."""
    arr = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    arr = np.squeeze(arr)
    if arr.ndim == 2:
        return np.ascontiguousarray(arr.T)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return np.ascontiguousarray(arr.transpose(1, 0, 2))
    if arr.ndim == 3 and arr.shape[0] in (3, 4):
        return np.ascontiguousarray(arr.transpose(2, 1, 0))
    raise ValueError(f"expected a 2D image (optionally with 3 or 4 colour channels), got shape {arr.shape}")


def from_hw(array: np.ndarray) -> np.ndarray:
    """numpy (H, W) -> MONAI (x, y)."""
    return np.ascontiguousarray(np.asarray(array).T)


_loader = LoadImage(image_only=True)


def _load(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    data = _loader(path)
    meta = dict(data.meta) if isinstance(data, MetaTensor) else {}
    return to_hw(data), meta


def read_image(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image as float32 (H, W) or (H, W, 3) and its MONAI metadata."""
    image, meta = _load(path)
    image = image.astype(np.float32)
    if image.ndim == 3:
        image = image[..., :3]  # drop alpha
    return image, meta


def read_label(path: str) -> np.ndarray:
    """Read a label map as int64 (H, W)."""
    label, _ = _load(path)
    if label.ndim == 3:
        label = label[..., 0]
    return np.rint(label).astype(np.int64)


def load_datalist(
    dataset_dir: str,
    num_images: int | None = None,
    reference_image: str | None = None,
    reference_label: str | None = None,
) -> tuple[Case, list[Case], dict[int, str]]:
    """Reference case, target cases and class names from ``dataset_dir/dataset.json`` (MONAI decathlon format).

    The reference is the first case by sorted image name unless given explicitly. Unlabelled entries
    (``test`` list, or ``training`` items without ``label``) become unlabelled targets.
    """
    path = os.path.join(dataset_dir, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no datalist: {path} does not exist (expected a MONAI decathlon dataset.json)")
    with open(path) as f:
        spec = json.load(f)
    items = []
    for item in spec.get("training", []) + spec.get("test", []):
        if isinstance(item, str):
            item = {"image": item}
        image = os.path.join(dataset_dir, item["image"])
        label = os.path.join(dataset_dir, item["label"]) if item.get("label") else None
        items.append(Case(case_id(image), image, label))
    items.sort(key=lambda c: os.path.basename(c.image_path))
    names = {int(k): v for k, v in spec.get("labels", {}).items() if int(k) != 0}
    if reference_image:
        same = [c for c in items if os.path.abspath(c.image_path) == os.path.abspath(reference_image)]
        # a reference named from the datalist keeps its listed label unless another is given
        reference = same[0] if same else Case(case_id(reference_image), reference_image, reference_label)
        targets = [c for c in items if c not in same]
    else:
        labelled = [c for c in items if c.label_path]
        if not labelled:
            raise InvalidReferenceError(f"{path}: no labelled case to use as reference; pass --reference_image/label")
        reference = labelled[0]
        targets = [c for c in items if c is not reference]
    if reference_label:
        reference.label_path = reference_label
    if num_images is not None and num_images > 0:
        targets = targets[: int(num_images)]
    return reference, targets, names


def to_class_index(label: np.ndarray, class_values: list[int]) -> np.ndarray:
    """Label values -> class indices 1..C in the order of ``class_values``; any other value -> 0 (background)."""
    index = np.zeros(max(class_values) + 1, np.int64)
    index[class_values] = np.arange(1, len(class_values) + 1)
    return np.where(label <= max(class_values), index[np.clip(label, 0, len(index) - 1)], 0)


def save_label(label: np.ndarray, path: str, meta: dict[str, Any] | None = None) -> str:
    """Write a (H, W) label map; PNG/JPG/BMP/TIFF paths as 8-bit PNG, otherwise NIfTI with the input's affine.

    The file is written under a temporary name and renamed, so a crash never leaves a half-written output.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = torch.as_tensor(from_hw(label.astype(np.uint8)))[None]
    tmp = path + ".part" + (".png" if path.endswith(".png") else ".nii.gz")
    if path.endswith(".png"):
        writer = PILWriter(output_dtype=np.uint8, scale=None)
        writer.set_data_array(data, channel_dim=0, squeeze_end_dims=True)
        writer.write(tmp, verbose=False)
    else:
        nib.save(nib.Nifti1Image(from_hw(label.astype(np.uint8)), _affine_4x4(meta)), tmp)
    os.replace(tmp, path)
    return path


def _affine_4x4(meta: dict[str, Any] | None) -> np.ndarray:
    """The input's affine (as read, before any MONAI reorientation) as a 4x4 matrix; identity when unknown."""
    meta = meta or {}
    affine = meta.get("original_affine", meta.get("affine"))
    if affine is None:
        return np.eye(4)
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if affine.shape == (4, 4):
        return affine
    out = np.eye(4)  # a 2D (3x3) affine: x, y and translation
    out[:2, :2], out[:2, 3] = affine[:2, :2], affine[:2, 2]
    return out


def output_name(case: Case) -> str:
    """Prediction file name: PNG for raster input, NIfTI for everything else."""
    lower = case.image_path.lower()
    if lower.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        return f"{case.id}.png"
    return f"{case.id}.nii.gz"
