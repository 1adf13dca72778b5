"""Reading cases and writing label maps.

One orientation boundary: MONAI readers return 2D arrays as (x, y) = (column, row); everything inside the
bundle works in numpy's (row, column) = (H, W) order. ``to_hw`` and ``from_hw`` are the only crossings.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import ITKReader, NibabelReader, PILReader, PILWriter, PydicomReader
from monai.transforms import LoadImage
from pydicom.dataset import Dataset

from bundle.console import quiet
from bundle.dicom import read_dicom_volume

__all__ = [
    "Case",
    "InvalidReferenceError",
    "Volume",
    "is_dicom",
    "read_volume",
    "read_target",
    "check_target",
    "read_image",
    "read_label",
    "read_label_volume",
    "to_array",
    "to_hw",
    "from_hw",
    "save_label",
    "save_prediction",
    "output_name",
    "to_class_index",
    "case_id",
    "IMAGE_EXTS",
]

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


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
    for ext in IMAGE_EXTS:
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


RASTER_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Volume:
    """An input image as a stack of 2D slices in numpy (row, column) order, plus what writing results back needs.

    A 2D input is a stack of one slice (``axis`` None). A 3D input (NIfTI volume, DICOM series or multi-frame file)
    is cut along ``axis``, an index into the MONAI array's spatial axes (x, y, z). A DICOM input read by
    ``read_dicom_volume`` carries its source datasets (pixel data dropped) in the order of the z axis: one per file
    of a series, or the one multi-frame dataset whose frames are the z slices.
    """

    slices: np.ndarray  # (Z, H, W) or (Z, H, W, 3), float32
    meta: dict[str, Any]
    kind: str  # raster | nifti | dicom | other
    axis: int | None = None
    spatial_shape: tuple[int, ...] = ()
    dicom_sources: list[Dataset] | None = field(default=None, repr=False)

    @property
    def is_3d(self) -> bool:
        return len(self.slices) > 1


def is_dicom(path: str) -> bool:
    """A DICOM file (by extension or by its DICM preamble) or a folder holding DICOM files."""
    if os.path.isdir(path):
        return any(is_dicom(os.path.join(path, f)) for f in sorted(os.listdir(path))[:5])
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


_READERS = {"nifti": NibabelReader, "raster": PILReader, "itk": ITKReader, "pydicom": PydicomReader}
_loaders: dict[str, LoadImage] = {}


def _loader(reader: str) -> LoadImage:
    """One MONAI loader per reader, made once (making one registers every reader, which logs each time)."""
    if reader not in _loaders:
        # making a loader tries every MONAI reader; the GPU DICOM decoder's absence is no news on a CPU run
        with quiet("NvImgCodecPydicomReader", loggers=("monai.data.nvimgcodec_pydicom_plugin",)):
            _loaders[reader] = LoadImage(image_only=True, ensure_channel_first=True, reader=_READERS[reader]())
    return _loaders[reader]


def _readers(path: str) -> tuple[str, list[str]]:
    """The kind of an input and the MONAI readers to try, in order."""
    lower = path.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return "nifti", ["nifti"]
    if lower.endswith(RASTER_EXTS):
        return "raster", ["raster"]
    if is_dicom(path):
        # ITKReader keeps the colour channel of RGB and multi-frame files, and sorts a series folder by position
        # along the slice normal; PydicomReader (the fallback) stacks a folder by instance number
        return "dicom", ["itk", "pydicom"]
    return "other", ["itk"]


def _load(path: str) -> tuple[np.ndarray, dict[str, Any], str, list[Dataset] | None]:
    """Channel-first float32 MONAI array (C, x, y[, z]), its metadata, the input's kind and, for DICOM read in one
    pydicom pass, the source datasets along z (None otherwise).

    DICOM goes through ``read_dicom_volume``; what it cannot read (a folder of several series, pixel data without
    a decoder, ...) falls back to MONAI's ITK and pydicom readers, without source datasets (no DICOM SEG).
    """
    if not os.path.exists(path):
        raise FileNotFoundError("file not found")
    kind, readers = _readers(path)
    error: Exception | None = None
    if kind == "dicom":
        try:
            pixels, sources, meta = read_dicom_volume(path)
            # (Z, H, W[, 3]) -> (C, x, y, z): a view, so that cutting along z gives ``pixels`` back without a copy
            arr = pixels.transpose(3, 2, 1, 0) if pixels.ndim == 4 else pixels.transpose(2, 1, 0)[None]
            return arr, meta, kind, sources
        except Exception as e:  # noqa: BLE001 - the MONAI readers may still read it
            logger.warning("%s: read with MONAI's readers, without DICOM SEG output, because %s", path, e)
            error = e
    for reader in readers:
        try:
            data = _loader(reader)(path)
            arr = np.asarray(data.detach().cpu() if isinstance(data, torch.Tensor) else data, dtype=np.float32)
            return arr, dict(getattr(data, "meta", {})), kind, None
        except Exception as e:  # noqa: BLE001 - try the next reader, report the first failure
            error = error or e
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(f"no reader could read it ({reason[:300]})") from error


def _channels_last(arr: np.ndarray) -> np.ndarray:
    """(C, ...) -> (...) for one channel, (..., 3) for colour (alpha dropped)."""
    if arr.shape[0] == 1:
        return arr[0]
    if arr.shape[0] in (3, 4):
        return np.moveaxis(arr[:3], 0, -1)
    raise ValueError(f"expected 1, 3 or 4 channels, got {arr.shape[0]}")


def read_volume(path: str, slice_axis: int = -1) -> Volume:
    """Read any supported input as a stack of (H, W[, 3]) float32 slices; 3D inputs are cut along ``slice_axis``."""
    arr, meta, kind, sources = _load(path)
    spatial = tuple(arr.shape[1:])
    if len(spatial) == 2:
        return Volume(to_hw(_channels_last(arr))[None], meta, kind, None, spatial)
    if len(spatial) != 3:
        raise ValueError(f"{path}: expected a 2D or 3D image, got array shape {tuple(arr.shape)}")
    # a 2D image stored with a singleton axis (single-frame DICOM, one-slice NIfTI) is a one-slice stack along it
    axis = spatial.index(1) if 1 in spatial else slice_axis % 3
    stack = np.moveaxis(_channels_last(arr), axis, 0)  # (Z, p, q[, 3])
    return Volume(np.ascontiguousarray(np.swapaxes(stack, 1, 2)), meta, kind, axis, spatial, sources)


MIN_SIZE = 32


def check_target(image: np.ndarray) -> str | None:
    """Why an image (a 2D image or a stack of slices) cannot be segmented (too small, non-finite, constant), or None."""
    h, w = image.shape[-3:-1] if image.ndim == 4 or (image.ndim == 3 and image.shape[-1] == 3) else image.shape[-2:]
    if min(h, w) < MIN_SIZE:
        return f"image is {w}x{h} px, smaller than {MIN_SIZE} px"
    if not np.isfinite(image).all():
        return "image has non-finite values"
    if float(image.max()) == float(image.min()):
        return "image is constant"
    return None


def read_target(path: str, slice_axis: int = -1) -> tuple[Volume | None, str | None]:
    """A target read and checked: (volume, None), or (None, why it cannot be segmented) for any failure."""
    try:
        volume = read_volume(path, slice_axis)
    except Exception as e:  # noqa: BLE001 - an unreadable target is reported, the run goes on
        return None, f"cannot be read: {e}"
    problem = check_target(volume.slices)
    return (None, problem) if problem else (volume, None)


def to_array(slices: np.ndarray, volume: Volume) -> np.ndarray:
    """(Z, H, W) slices -> the input's MONAI spatial layout (x, y[, z]); the inverse of ``read_volume``."""
    if volume.axis is None:
        return from_hw(slices[0])
    return np.moveaxis(np.swapaxes(slices, 1, 2), 0, volume.axis)


def read_image(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a 2D image as float32 (H, W) or (H, W, 3) and its MONAI metadata."""
    volume = read_volume(path)
    if volume.is_3d:
        raise ValueError(f"{path} is a 3D image ({volume.spatial_shape}); expected 2D")
    return volume.slices[0], volume.meta


def read_label(path: str) -> np.ndarray:
    """Read a 2D label map as int64 (H, W)."""
    label, _ = read_image(path)
    if label.ndim == 3:
        label = label[..., 0]
    return np.rint(label).astype(np.int64)


def read_label_volume(path: str, like: Volume) -> np.ndarray:
    """Read a label map as int64 (Z, H, W) slices cut the same way as the image ``like``."""
    volume = read_volume(path, -1 if like.axis is None else like.axis)
    label = volume.slices[..., 0] if volume.slices.ndim == 4 else volume.slices
    return np.rint(label).astype(np.int64)


def to_class_index(label: np.ndarray, class_values: list[int]) -> np.ndarray:
    """Label values -> class indices 1..C in the order of ``class_values``; any other value -> 0 (background)."""
    index = np.zeros(max(class_values) + 1, np.int64)
    index[class_values] = np.arange(1, len(class_values) + 1)
    return np.where(label <= max(class_values), index[np.clip(label, 0, len(index) - 1)], 0)


def save_label(label: np.ndarray, path: str, meta: dict[str, Any] | None = None) -> str:
    """Write a (H, W) label map: PNG/JPG/BMP/TIFF paths as 8-bit PNG, otherwise NIfTI with the input's affine."""
    return save_prediction(label[None], path, Volume(label[None], meta or {}, "raster"))


def save_prediction(slices: np.ndarray, path: str, volume: Volume) -> str:
    """Write (Z, H, W) label slices in the geometry of the input ``volume``: a PNG (one slice) or a NIfTI with the
    input's affine and array layout.

    The file is written under a temporary name and renamed, so a crash never leaves a half-written output.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part" + (".png" if path.endswith(".png") else ".nii.gz")
    if path.endswith(".png"):
        if len(slices) != 1:
            raise ValueError(f"{path}: a PNG holds one slice, got {len(slices)}")
        writer = PILWriter(output_dtype=np.uint8, scale=None)
        writer.set_data_array(torch.as_tensor(from_hw(slices[0].astype(np.uint8)))[None], channel_dim=0)
        writer.write(tmp, verbose=False)
    else:
        data = to_array(slices.astype(np.uint8), volume)
        nib.save(nib.Nifti1Image(data, _affine_4x4(volume.meta)), tmp)
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
    if case.image_path.lower().endswith(RASTER_EXTS):
        return f"{case.id}.png"
    return f"{case.id}.nii.gz"
