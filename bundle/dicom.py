"""DICOM input: reading a file, a multi-frame file or a series in slice order, as datasets and as pixels.

Slice order (the ``Z`` axis of every (Z, H, W) array here):

* a series of single-frame files is sorted by ascending position along the slice normal, that is by
  ``dot(ImagePositionPatient, row_direction x column_direction)`` with both directions taken from
  ``ImageOrientationPatient``; when any slice lacks position or orientation, by ascending ``InstanceNumber``;
  ties keep the file-name order. ``sort_slices(..., by="instance")`` gives the ascending ``InstanceNumber`` order
  that MONAI's ``PydicomReader`` stacks a folder in; the two agree when instance numbers grow along the normal.
* a multi-frame file keeps its stored frame order (frame 1 first), as ``pixel_array`` and MONAI return it.

``H`` and ``W`` are the DICOM rows and columns: pixel (r, c) lies at
``ImagePositionPatient + c * PixelSpacing[1] * row_direction + r * PixelSpacing[0] * column_direction``.

``read_dicom_volume`` is the one pass over a DICOM input: pixels, source datasets (pixel data dropped, for the SEG)
and the affine of the MONAI-layout (x = column, y = row, z = slice) array, in MONAI ``ITKReader``'s convention.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

__all__ = [
    "read_dicom_volume",
    "check_image",
    "dataset_name",
    "num_frames",
    "read_dicom_datasets",
    "sort_slices",
    "dicom_pixels",
    "dicom_affine",
    "drop_pixels",
]

_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# the image pixel description every image keeps once ``drop_pixels`` took its pixel data
_PIXEL_HEADER = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
# projection radiography (CR, DX, MG, IO, XA, XRF and their enhanced forms): ITK takes the detector's
# ImagerPixelSpacing as the pixel spacing of these
_IMAGER_SPACING_CLASSES = {
    "1.2.840.10008.5.1.4.1.1." + s
    for s in ("1", "1.1", "1.1.1", "1.2", "1.2.1", "1.3", "1.3.1", "12.1", "12.1.1", "12.2", "12.2.1")
}


def dataset_name(ds: Dataset) -> str:
    filename = getattr(ds, "filename", None)
    return str(filename) if isinstance(filename, (str, os.PathLike)) else f"dataset {ds.get('SOPInstanceUID', '?')}"


def check_image(ds: Dataset, pixels: bool = True) -> None:
    """Raise ``ValueError`` unless ``ds`` is an image: pixel data (``pixels=False``: pixel data, or the image pixel
    description a dataset keeps once ``drop_pixels`` took its pixel data), Rows and Columns."""
    header = not pixels and all(k in ds for k in _PIXEL_HEADER)
    if not header and not any(k in ds for k in _PIXEL_DATA):
        kind = ds.SOPClassUID.name if "SOPClassUID" in ds else "unknown SOP class"
        raise ValueError(
            f"{dataset_name(ds)}: not an image ({kind}, no pixel data); a DICOM image or series is required"
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError(f"{dataset_name(ds)}: pixel data without Rows/Columns is not supported")


def _read(path: str, check: bool = True) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable DICOM file ({err})") from err
    if check:
        check_image(ds)
    return ds


def num_frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _normal(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    return np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))


def sort_slices(datasets: Sequence[Dataset], by: str = "position") -> list[Dataset]:
    """Single-frame slices in slice order (see the module docstring); ``by`` is ``"position"`` or ``"instance"``."""
    if by not in ("position", "instance"):
        raise ValueError(f"by must be 'position' or 'instance', got {by!r}")
    items = list(datasets)
    normal = _normal(items[0]) if items else None
    geometric = normal is not None and all("ImagePositionPatient" in d and _normal(d) is not None for d in items)
    if by == "position" and geometric:
        for d in items:
            if not np.allclose(_normal(d), normal, atol=1e-4):
                raise ValueError(f"{dataset_name(d)}: slice orientation differs from the rest of the series")
        return sorted(items, key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, float), normal)))
    if all("InstanceNumber" in d and d.InstanceNumber is not None for d in items):
        return sorted(items, key=lambda d: int(d.InstanceNumber))
    return items


def read_dicom_datasets(path: str, by: str = "position") -> list[Dataset]:
    """Source datasets of a single-frame file, a multi-frame file, or a folder holding one series, in slice order.

    A multi-frame file gives one dataset (its frames are the slices). In a folder, non-DICOM files and DICOMDIR
    are skipped; a DICOM file without pixel data, several series, or a multi-frame file among others raise
    ``ValueError``.
    """
    if not os.path.isdir(path):
        return [_read(path)]
    datasets = []
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not os.path.isfile(file) or not pydicom.misc.is_dicom(file):
            continue
        ds = _read(file, check=False)
        if getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID") == _MEDIA_DIRECTORY:
            continue
        check_image(ds)
        datasets.append(ds)
    if not datasets:
        raise ValueError(f"{path}: no DICOM image in this folder")
    series = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise ValueError(f"{path}: holds {len(series)} series ({', '.join(sorted(series))}); one series is required")
    if len(datasets) > 1 and any(num_frames(d) > 1 for d in datasets):
        multi = next(d for d in datasets if num_frames(d) > 1)
        raise ValueError(f"{dataset_name(multi)}: a multi-frame file must be the only image of its folder")
    shapes = {(int(d.Rows), int(d.Columns)) for d in datasets}
    if len(shapes) > 1:
        raise ValueError(f"{path}: slices of different sizes {sorted(shapes)}")
    return sort_slices(datasets, by)


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    groups = ([per_frame[frame]] if frame < len(per_frame) else []) + list(shared[:1])
    candidates = [g.PixelValueTransformationSequence[0] for g in groups if g.get("PixelValueTransformationSequence")]
    for item in candidates + [ds]:
        if item.get("RescaleSlope") is not None:
            return float(item.RescaleSlope), float(item.get("RescaleIntercept") or 0)
    return 1.0, 0.0


def dicom_pixels(datasets: Dataset | Sequence[Dataset]) -> np.ndarray:
    """float32 (Z, H, W) volume, or (Z, H, W, 3) for colour, in the order of ``datasets`` (frames in stored order).

    Rescale slope and intercept are applied per frame (functional groups first, then the top-level attributes);
    MONOCHROME1 pixels are then negated (presentation: bright is high, as ITK reads them up to an offset).
    """
    items = [datasets] if isinstance(datasets, Dataset) else list(datasets)
    if not items:
        raise ValueError("no DICOM dataset given")
    slices = []
    for ds in items:
        check_image(ds)
        arr = np.asarray(ds.pixel_array)
        colour = int(ds.get("SamplesPerPixel", 1)) > 1
        if arr.ndim == (3 if colour else 2):
            arr = arr[None]
        # MONOCHROME1 shows low values bright: negated, so that bright is high as for every other image
        sign = np.float32(-1.0 if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" else 1.0)
        for i, frame in enumerate(arr):
            slope, intercept = (1.0, 0.0) if colour else _rescale(ds, i)
            slices.append(sign * (frame.astype(np.float32) * np.float32(slope) + np.float32(intercept)))
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise ValueError(f"slices of different shapes {sorted(shapes)}")
    return np.stack(slices)


def drop_pixels(ds: Dataset) -> Dataset:
    """``ds`` without its pixel data, in place (the decoded array pydicom keeps goes with it); returned for chaining.
    What remains is the header a DICOM SEG is written over (``check_image(ds, pixels=False)`` accepts it)."""
    for keyword in _PIXEL_DATA:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _frame_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` for one frame: from its per-frame functional group's ``sequence``, the shared group's, else the
    top level; None when absent."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for group in ([per_frame[frame]] if frame < len(per_frame) else []) + list(shared[:1]):
        items = group.get(sequence)
        if items and items[0].get(keyword) is not None:
            return items[0].get(keyword)
    return ds.get(keyword)


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(row spacing, column spacing) in mm; (1, 1) when the file gives none."""
    spacing = _frame_value(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
    if str(ds.get("SOPClassUID", "")) in _IMAGER_SPACING_CLASSES:
        spacing = ds.get("ImagerPixelSpacing") or spacing
    if spacing is None or len(spacing) != 2 or min(float(v) for v in spacing) <= 0:
        return 1.0, 1.0
    return float(spacing[0]), float(spacing[1])


def dicom_affine(datasets: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """The 4x4 RAS affine of the (x = column, y = row, z = slice) array of ``datasets`` (as ``read_dicom_datasets``
    orders them) and its (x, y, z) spacing, as MONAI's ``ITKReader`` gives them.

    Origin: the first slice's ImagePositionPatient (0 without it). Directions: ImageOrientationPatient's row and
    column directions and their cross product (identity without it). Spacing: PixelSpacing (ImagerPixelSpacing for
    projection radiographs; 1 without it); along z, the distance between the first and the last slice over the
    number of gaps, pointing the normal towards the last slice; for one slice, or slices without positions,
    SpacingBetweenSlices (else 1). LPS to RAS: the first two rows negated.
    """
    first = datasets[0]
    n = sum(num_frames(d) for d in datasets)
    if len(datasets) == 1:
        positions = [_frame_value(first, f, "PlanePositionSequence", "ImagePositionPatient") for f in range(n)]
    else:
        positions = [d.get("ImagePositionPatient") for d in datasets]
    iop = _frame_value(first, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    row, col = (np.asarray(iop[:3], float), np.asarray(iop[3:], float)) if iop and len(iop) == 6 else np.eye(3)[:2]
    normal = np.cross(row, col)
    origin = np.asarray(positions[0], float) if positions[0] and len(positions[0]) == 3 else np.zeros(3)
    row_spacing, col_spacing = _pixel_spacing(first)
    gap = _frame_value(first, 0, "PixelMeasuresSequence", "SpacingBetweenSlices")
    z_spacing, z_dir = (float(gap) if gap and float(gap) > 0 else 1.0), normal
    ends = [positions[0], positions[-1]]
    if n > 1 and all(p and len(p) == 3 for p in ends):
        span = np.asarray(ends[1], float) - np.asarray(ends[0], float)
        if np.linalg.norm(span) > 1e-6:
            z_spacing = float(np.linalg.norm(span)) / (n - 1)
            z_dir = -normal if float(span @ normal) < 0 else normal
    affine = np.eye(4)
    affine[:3, :3] = np.stack([row * col_spacing, col * row_spacing, z_dir * z_spacing], axis=1)
    affine[:3, 3] = origin
    affine[:2] *= -1
    return affine, np.array([col_spacing, row_spacing, z_spacing])


def read_dicom_volume(path: str) -> tuple[np.ndarray, list[Dataset], dict[str, Any]]:
    """Read a DICOM file, multi-frame file or series folder once: its float32 (Z, H, W) or (Z, H, W, 3) pixels in
    slice order (``dicom_pixels``), its source datasets in the same order with their pixel data dropped, and MONAI
    metadata of the (C, x = column, y = row, z = slice) array: ``affine`` and ``original_affine`` (``dicom_affine``),
    ``spacing``, ``spatial_shape`` (W, H, Z), ``space``, ``original_channel_dim`` and ``filename_or_obj``."""
    datasets = read_dicom_datasets(path)
    pixels = dicom_pixels(datasets)
    affine, spacing = dicom_affine(datasets)
    for ds in datasets:
        drop_pixels(ds)
    meta = {
        "affine": affine,
        "original_affine": affine.copy(),
        "spacing": spacing,
        "spatial_shape": np.array([pixels.shape[2], pixels.shape[1], pixels.shape[0]]),
        "space": "RAS",
        "original_channel_dim": -1 if pixels.ndim == 4 else "no_channel",
        "filename_or_obj": path,
    }
    return pixels, datasets, meta
