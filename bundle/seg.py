"""DICOM Segmentation output and input: writing a SEG of the label map for its source images, and reading a SEG back
as a label map on the slices of its source (a SEG as the reference label).

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

from bundle.dicom import check_image, dataset_name, num_frames

__all__ = [
    "ALGORITHM_NAME",
    "SERIES_DESCRIPTION",
    "bundle_version",
    "complete_type2",
    "write_dicom_seg",
    "is_seg",
    "read_seg_label",
]

ALGORITHM_NAME = "oneshot-sam"
SERIES_DESCRIPTION = "One-shot SAM segmentation"
DEFAULT_CATEGORY = codes.SCT.Tissue
DEFAULT_TYPE = codes.SCT.Tissue
_METADATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "metadata.json")


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
        check_image(ds, pixels=False)  # the carried sources hold no pixel data (drop_pixels)
        if ds.get("SOPClassUID") == pydicom.uid.SegmentationStorage:
            raise ValueError(f"{dataset_name(ds)}: is a DICOM Segmentation, not an image to segment")
        if num_frames(ds) > 1 and not (ds.get("SharedFunctionalGroupsSequence") and "FrameOfReferenceUID" in ds):
            raise ValueError(
                f"{dataset_name(ds)}: multi-frame {ds.SOPClassUID.name if 'SOPClassUID' in ds else 'image'} without "
                "functional groups or frame of reference is not supported (enhanced multi-frame images are)"
            )
    if len(sources) > 1 and any(num_frames(ds) > 1 for ds in sources):
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
    n_frames = sum(num_frames(ds) for ds in items)
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
        raise ValueError(
            f"{dataset_name(items[0])}: cannot write a DICOM Segmentation for this source ({err})"
        ) from err

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part"
    try:
        seg.save_as(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
        if len(sources) == 1 and num_frames(sources[0]) > 1:
            frames = list(range(1, num_frames(sources[0]) + 1))
            pixels = seg.get_pixels_by_source_frame(sources[0].SOPInstanceUID, frames, **options)
        else:
            pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], **options)
    except (ValueError, KeyError, IndexError) as err:
        raise ValueError(f"{path}: does not segment the reference image's slices ({err})") from err
    return np.asarray(pixels, dtype=np.int64), names
