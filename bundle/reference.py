"""The reference: read, checked (one clear message naming the file when it cannot serve) and cut into slices."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pydicom

from bundle.io import Case, InvalidReferenceError, Volume, check_target, read_label_volume, read_volume, to_class_index
from bundle.seg import is_seg, read_seg_label
from bundle.transforms import scale_intensity

__all__ = ["ReferenceSlice", "check_reference", "reference_names"]


@dataclass
class ReferenceSlice:
    """One reference slice and the classes (indices into the class list, 0-based) it is the reference for."""

    image: np.ndarray  # (H, W[, 3]), display range
    label: np.ndarray  # (H, W) class indices 1..len(classes) of this group
    classes: list[int]
    slice_index: int = 0


def check_reference(
    case: Case,
    class_values: list[int] | None = None,
    slice_axis: int = -1,
    reference_slice: int | None = None,
    window: tuple[float, float] | None = None,
) -> tuple[list[ReferenceSlice], list[int]]:
    """Read the reference and fail with one clear message naming the file when it cannot serve as a reference.

    A labelled volume is cut into slices; unless ``reference_slice`` names one, each class takes the slice where it
    has the largest area, and classes sharing a slice share a reference. Returns the references and the label
    values of the classes (sorted, background 0 excluded).
    """
    if not os.path.exists(case.image_path):
        raise InvalidReferenceError(f"reference image not found: {case.image_path}")
    if not case.label_path:
        raise InvalidReferenceError(f"reference image {case.image_path} has no label map")
    if not os.path.exists(case.label_path):
        raise InvalidReferenceError(f"reference label not found: {case.label_path}")
    try:
        volume = read_volume(case.image_path, slice_axis)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported the same way
        raise InvalidReferenceError(f"reference image {case.image_path} cannot be read: {e}") from e
    try:
        label = _seg_label(case, volume) if is_seg(case.label_path) else read_label_volume(case.label_path, volume)
    except Exception as e:  # noqa: BLE001
        raise InvalidReferenceError(f"reference label {case.label_path} cannot be read: {e}") from e
    if volume.slices.shape[:3] != label.shape:
        raise InvalidReferenceError(
            f"reference label {case.label_path} is {_size(label.shape)} but the image {case.image_path} is "
            f"{_size(volume.slices.shape[:3])}"
        )
    present = sorted(int(v) for v in np.unique(label) if v != 0)
    if not present:
        raise InvalidReferenceError(f"reference label {case.label_path} is empty (no foreground pixel)")
    problem = check_target(volume.slices)
    if problem:
        raise InvalidReferenceError(f"reference image {case.image_path}: {problem}")
    if class_values:
        missing = [v for v in class_values if v not in present]
        extra = [v for v in present if v not in class_values]
        if missing or extra:
            raise InvalidReferenceError(
                f"reference label {case.label_path} has values {present}; the class map expects {class_values}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unknown {extra})" if extra else "")
            )
    class_values = class_values or present
    index = to_class_index(label, class_values)
    if reference_slice is not None:
        if not 0 <= reference_slice < len(index):
            raise InvalidReferenceError(
                f"reference_slice {reference_slice} is outside {case.image_path} ({len(index)} slices)"
            )
        best = [int(reference_slice)] * len(class_values)
    else:
        areas = np.stack([(index == c + 1).reshape(len(index), -1).sum(1) for c in range(len(class_values))])
        best = areas.argmax(1).tolist()
    image = scale_intensity(volume.slices, window)
    refs = []
    for z in sorted(set(best)):
        classes = [c for c in range(len(class_values)) if best[c] == z]
        lut = np.zeros(len(class_values) + 1, np.int64)
        lut[[c + 1 for c in classes]] = np.arange(1, len(classes) + 1)
        group = lut[index[z]]
        if not group.any():
            raise InvalidReferenceError(
                f"reference slice {z} of {case.label_path} has none of the classes {[class_values[c] for c in classes]}"
            )
        refs.append(ReferenceSlice(image[z], group, classes, z))
    return refs, class_values


def _seg_label(case: Case, volume: Volume) -> np.ndarray:
    """A DICOM SEG reference label as (Z, H, W) segment numbers on the slices of the reference image as read."""
    if volume.kind != "dicom":
        raise ValueError("a DICOM SEG can only label a DICOM reference image")
    if volume.dicom_sources is None:
        raise ValueError(f"pydicom cannot read the slices of {case.image_path} (see the log) to match its SEG to them")
    if volume.axis != 2:
        raise ValueError(f"{case.image_path} is cut along axis {volume.axis}, not across its DICOM slices")
    label, _ = read_seg_label(case.label_path, volume.dicom_sources)
    return label


def reference_names(case: Case) -> dict[int, str]:
    """Class names the reference label itself carries (a DICOM SEG's segment labels by number), else none."""
    if not case.label_path or not is_seg(case.label_path):
        return {}
    ds = pydicom.dcmread(case.label_path, stop_before_pixels=True)
    return {int(d.SegmentNumber): str(d.SegmentLabel) for d in ds.get("SegmentSequence", [])}


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[2]}x{shape[1]} px" if shape[0] == 1 else f"{shape[0]} slices of {shape[2]}x{shape[1]} px"
