"""DICOM input and output: reading a series in slice order, and writing a DICOM Segmentation for it.

Slice order (the ``Z`` axis of every (Z, H, W) array here):

* a series of single-frame files is sorted by ascending position along the slice normal, that is by
  ``dot(ImagePositionPatient, row_direction x column_direction)`` with both directions taken from
  ``ImageOrientationPatient``; when any slice lacks position or orientation, by ascending ``InstanceNumber``;
  ties keep the file-name order. ``sort_slices(..., by="instance")`` gives the ascending ``InstanceNumber`` order
  that MONAI's ``PydicomReader`` stacks a folder in; the two agree when instance numbers grow along the normal.
* a multi-frame file keeps its stored frame order (frame 1 first), as ``pixel_array`` and MONAI return it.

``H`` and ``W`` are the DICOM rows and columns: pixel (r, c) lies at
``ImagePositionPatient + c * PixelSpacing[1] * row_direction + r * PixelSpacing[0] * column_direction``.

Segments of the written SEG use the generic SNOMED CT category "Tissue" (85756007) and type "Tissue" (85756007),
members of CID 7150 and CID 7166, because class names are free text; pass ``property_codes`` for exact terms.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ALGORITHM_NAME",
    "SERIES_DESCRIPTION",
    "read_dicom_series",
    "read_dicom_datasets",
    "sort_slices",
    "dicom_pixels",
    "bundle_version",
    "write_dicom_seg",
    "complete_type2",
    "is_seg",
    "read_seg_label",
]

ALGORITHM_NAME = "oneshot-sam"
SERIES_DESCRIPTION = "One-shot SAM segmentation"
DEFAULT_CATEGORY = codes.SCT.Tissue
DEFAULT_TYPE = codes.SCT.Tissue
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_METADATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "metadata.json")


def _name(ds: Dataset) -> str:
    filename = getattr(ds, "filename", None)
    return str(filename) if isinstance(filename, (str, os.PathLike)) else f"dataset {ds.get('SOPInstanceUID', '?')}"


def _check_image(ds: Dataset) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = ds.SOPClassUID.name if "SOPClassUID" in ds else "unknown SOP class"
        raise ValueError(f"{_name(ds)}: not an image ({kind}, no pixel data); a DICOM image or series is required")
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError(f"{_name(ds)}: pixel data without Rows/Columns is not supported")


def _read(path: str, check: bool = True) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable DICOM file ({err})") from err
    if check:
        _check_image(ds)
    return ds


def _frames(ds: Dataset) -> int:
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
                raise ValueError(f"{_name(d)}: slice orientation differs from the rest of the series")
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
        _check_image(ds)
        datasets.append(ds)
    if not datasets:
        raise ValueError(f"{path}: no DICOM image in this folder")
    series = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise ValueError(f"{path}: holds {len(series)} series ({', '.join(sorted(series))}); one series is required")
    if len(datasets) > 1 and any(_frames(d) > 1 for d in datasets):
        multi = next(d for d in datasets if _frames(d) > 1)
        raise ValueError(f"{_name(multi)}: a multi-frame file must be the only image of its folder")
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
        _check_image(ds)
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


def bundle_version() -> str:
    """The bundle's version from configs/metadata.json (``"unknown"`` when unreadable)."""
    try:
        with open(_METADATA) as f:
            return str(json.load(f)["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def _classes(class_names: Mapping[int, str] | Sequence[str]) -> list[tuple[int, str]]:
    if isinstance(class_names, Mapping):
        items = sorted((int(k), str(v)) for k, v in class_names.items() if int(k) != 0)
    else:
        items = [(i + 1, str(v)) for i, v in enumerate(class_names)]
    if not items:
        raise ValueError("class_names holds no foreground class")
    return items


def _check_sources(sources: Sequence[Dataset]) -> None:
    for ds in sources:
        _check_image(ds)
        if ds.get("SOPClassUID") == pydicom.uid.SegmentationStorage:
            raise ValueError(f"{_name(ds)}: is a DICOM Segmentation, not an image to segment")
        if _frames(ds) > 1 and not (ds.get("SharedFunctionalGroupsSequence") and "FrameOfReferenceUID" in ds):
            raise ValueError(
                f"{_name(ds)}: multi-frame {ds.SOPClassUID.name if 'SOPClassUID' in ds else 'image'} without "
                "functional groups or frame of reference is not supported (enhanced multi-frame images are)"
            )
    if len(sources) > 1 and any(_frames(ds) > 1 for ds in sources):
        raise ValueError("a multi-frame source must be given alone, not within a list of slices")


# type-2 attributes (present, possibly empty) of the patient and study modules that a SEG copies from its source:
# de-identified files often drop them, and the standard allows them empty
_TYPE2 = {
    "PatientName": "PN",
    "PatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "ReferringPhysicianName": "PN",
    "StudyID": "SH",
    "AccessionNumber": "SH",
}


def complete_type2(ds: Dataset) -> Dataset:
    """``ds`` with the patient and study type-2 attributes it lacks added empty (in place; returned for chaining)."""
    for keyword, vr in _TYPE2.items():
        if keyword not in ds:
            ds.add_new(keyword, vr, None)
    return ds


def write_dicom_seg(
    label: np.ndarray,
    sources: Dataset | Sequence[Dataset],
    class_names: Mapping[int, str] | Sequence[str],
    path: str,
    *,
    version: str | None = None,
    property_codes: Mapping[int, tuple[Code, Code]] | None = None,
    series_number: int = 300,
    instance_number: int = 1,
    manufacturer: str = "MONAI bundle oneshot-sam",
) -> str:
    """Write ``label`` as a BINARY DICOM Segmentation of ``sources`` to ``path`` (atomically) and return ``path``.

    ``label`` is (Z, H, W), or (H, W) for one frame, of label values in the slice order of ``sources`` (a list of
    single-frame datasets, or one multi-frame dataset whose frames are the slices). ``class_names`` maps label
    values to names (a list names values 1, 2, ...). Every class becomes a segment, numbered 1.. in ascending label
    value and labelled with its name, even when it has no pixel (such a segment has no frame); frames without any
    segment are omitted, unless the whole label is empty, when all frames are stored empty. ``property_codes`` maps
    a label value to its (category, type) codes. Label values that are neither 0 nor a class raise ``ValueError``.
    Patient and study type-2 attributes missing from the sources are added to them empty (``complete_type2``).
    """
    items = [sources] if isinstance(sources, Dataset) else list(sources)
    if not items:
        raise ValueError("no source DICOM dataset given")
    _check_sources(items)
    items = [complete_type2(ds) for ds in items]
    classes = _classes(class_names)
    label = np.asarray(label)
    if label.ndim == 2:
        label = label[None]
    n_frames = sum(_frames(ds) for ds in items)
    rows, cols = int(items[0].Rows), int(items[0].Columns)
    if label.ndim != 3 or label.shape != (n_frames, rows, cols):
        raise ValueError(f"label of shape {label.shape} does not match the sources' ({n_frames}, {rows}, {cols})")
    if label.dtype != bool and not np.issubdtype(label.dtype, np.integer) and not np.array_equal(label, np.rint(label)):
        raise ValueError("label must hold integer label values")
    label = label.astype(np.int64)
    unknown = sorted(set(np.unique(label).tolist()) - {0} - {v for v, _ in classes})
    if unknown:
        raise ValueError(f"label values {unknown} are neither background (0) nor in class_names")

    version = version or bundle_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    property_codes = property_codes or {}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name.replace("\\", "/")[:64],
            segmented_property_category=property_codes.get(value, (DEFAULT_CATEGORY, DEFAULT_TYPE))[0],
            segmented_property_type=property_codes.get(value, (DEFAULT_CATEGORY, DEFAULT_TYPE))[1],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, (value, name) in enumerate(classes, start=1)
    ]
    masks = np.stack([label == value for value, _ in classes], axis=-1)
    try:
        seg = hd.seg.Segmentation(
            source_images=items,
            pixel_array=masks,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=instance_number,
            manufacturer=manufacturer,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=version,
            device_serial_number="0",
            series_description=SERIES_DESCRIPTION,
        )
    except (ValueError, AttributeError, TypeError, KeyError) as err:
        raise ValueError(f"{_name(items[0])}: cannot write a DICOM Segmentation for this source ({err})") from err

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part"
    try:
        seg.save_as(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_dicom_series(path: str, by: str = "position") -> tuple[list[Dataset], np.ndarray]:
    """``read_dicom_datasets`` and ``dicom_pixels`` together: the sources in slice order and their volume."""
    datasets = read_dicom_datasets(path, by)
    return datasets, dicom_pixels(datasets)


def is_seg(path: str) -> bool:
    """Whether ``path`` is a DICOM Segmentation file."""
    if not os.path.isfile(path) or not pydicom.misc.is_dicom(path):
        return False
    return pydicom.dcmread(path, stop_before_pixels=True).get("SOPClassUID") == pydicom.uid.SegmentationStorage


def read_seg_label(path: str, sources: Sequence[Dataset]) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM SEG as a label map on its source slices: int64 (Z, H, W) of segment numbers (0 elsewhere) in the order
    of ``sources`` (single-frame datasets, or one multi-frame dataset whose frames are the slices), and each segment's
    label by number. Frames the SEG leaves out are empty."""
    try:
        seg = hd.seg.segread(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is one clear message
        raise ValueError(f"{path}: not a readable DICOM Segmentation ({err})") from err
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    options = dict(combine_segments=True, assert_missing_frames_are_empty=True, skip_overlap_checks=True)
    try:
        if len(sources) == 1 and _frames(sources[0]) > 1:
            frames = list(range(1, _frames(sources[0]) + 1))
            pixels = seg.get_pixels_by_source_frame(sources[0].SOPInstanceUID, frames, **options)
        else:
            pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], **options)
    except (ValueError, KeyError, IndexError) as err:
        raise ValueError(f"{path}: does not segment the reference image's slices ({err})") from err
    return np.asarray(pixels, dtype=np.int64), names
