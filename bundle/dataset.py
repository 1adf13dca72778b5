"""The images a run segments, as MONAI datasets whose transform (``PrepareTarget``) is the deterministic input
pipeline: read, check, cut into slices, intensity scaling, processing size."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import ignite.distributed as idist
import numpy as np
from monai.data import Dataset
from monai.transforms import Transform
from pydicom.dataset import Dataset as DicomDataset

from bundle.demo import make_demo_dataset
from bundle.io import IMAGE_EXTS, Case, InvalidReferenceError, Volume, case_id, read_target
from bundle.transforms import scale_intensity, shrink

__all__ = [
    "CohortDataset",
    "ImageDataset",
    "PrepareTarget",
    "SliceFiles",
    "Target",
    "load_datalist",
    "load_folder",
]

logger = logging.getLogger(__name__)


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


def load_folder(
    image_dir: str,
    reference_image: str | None,
    reference_label: str | None,
    pattern: str = "*",
    num_images: int | None = None,
) -> tuple[Case, list[Case]]:
    """Reference case and unlabelled target cases from a folder, without a datalist: every entry of ``image_dir``
    matching ``pattern`` that is an image file (a known extension, or none, as DICOM files often have), or a folder
    (a DICOM series), sorted by name; the reference image is never a target of its own."""
    if not reference_image or not reference_label:
        raise InvalidReferenceError("image_dir needs the reference: give reference_image and reference_label")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image_dir {image_dir} is not a folder")
    reference = Case(case_id(reference_image), reference_image, reference_label)
    skip = {os.path.abspath(reference_image), os.path.abspath(reference_label)}
    targets = []
    for name in sorted(os.listdir(image_dir)):
        path = os.path.join(image_dir, name)
        if name.startswith(".") or not fnmatch.fnmatch(name, pattern) or os.path.abspath(path) in skip:
            continue
        image = os.path.isdir(path) or name.lower().endswith(IMAGE_EXTS) or "." not in name
        if image:
            targets.append(Case(case_id(path), path, None))
    if not targets:
        raise FileNotFoundError(f"no image in {image_dir} matches {pattern!r}")
    if num_images is not None and num_images > 0:
        targets = targets[: int(num_images)]
    return reference, targets


@dataclass
class Target:
    """One input, read and prepared: ``images`` holds its (H, W[, 3]) slices at the processing size by key; ``keys``
    names each slice of the input (None: a constant slice, left empty). ``error`` says why it cannot be segmented."""

    case: Case
    volume: Volume | None = None  # geometry only: the full-resolution pixels are dropped once the slices are made
    shape: tuple[int, int, int] = (0, 0, 0)  # (Z, H, W) of the input
    keys: list[str | None] = field(default_factory=list)
    images: dict[str, np.ndarray] | SliceFiles = field(default_factory=dict, repr=False)
    # DICOM input cut across its files: the source datasets (pixel data dropped) in slice order; a SEG is written
    dicom_sources: list[DicomDataset] | None = field(default=None, repr=False)
    error: str | None = None
    done: bool = False  # its outputs are on disk from an earlier run of the same job


def _slice_sources(path: str, volume: Volume) -> list[DicomDataset] | None:
    """The DICOM datasets behind the slices of ``volume``, in slice order: its source datasets when it is cut along
    z (across the files, or across the frames of a multi-frame file), else None."""
    if volume.dicom_sources is None or volume.axis == 2:
        return volume.dicom_sources
    logger.warning(
        "no DICOM SEG for %s (NIfTI only): cut along axis %s, not across its DICOM slices", path, volume.axis
    )
    return None


class SliceFiles(Mapping):
    """Prepared slices kept on disk: ``files[key]`` reads the (H, W[, 3]) float32 slice back, so a cohort holds one
    slice in memory at a time instead of all of them. 8-bit content is stored as uint8 (read back exactly)."""

    def __init__(self, directory: str):
        self.directory, self.paths = directory, {}

    def add(self, key: str, image: np.ndarray) -> None:
        os.makedirs(self.directory, exist_ok=True)
        eight_bit = image.dtype == np.float32 and bool(np.all(image == np.round(image))) and 0 <= image.min()
        eight_bit = eight_bit and image.max() <= 255
        path = os.path.join(self.directory, hashlib.sha1(key.encode()).hexdigest() + (".u8" if eight_bit else ""))
        with open(path + ".part", "wb") as f:
            np.save(f, image.astype(np.uint8) if eight_bit else image)
        os.replace(path + ".part", path + ".npy")
        self.paths[key] = path + ".npy"

    def __getitem__(self, key: str) -> np.ndarray:
        return np.load(self.paths[key]).astype(np.float32, copy=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


class PrepareTarget(Transform):
    """``Case`` -> ``Target``: read, check, cut 3D inputs into slices along ``slice_axis``, scale intensities
    (``window`` or percentiles, per volume), shrink slices longer than ``max_size``.

    Args:
        slice_axis: spatial axis of the MONAI array (0 x, 1 y, 2 z) 3D inputs are cut along.
        window: CT-style (level, width); None: percentile clipping for images not already 8-bit.
        max_size: slices with a longer side are processed at this size.
        slice_dir: keep prepared slices in files here and read them back when needed (``SliceFiles``), so memory does
            not grow with the cohort (None: in memory). ``clear`` removes the folder.
    """

    def __init__(
        self,
        slice_axis: int = -1,
        window: Sequence[float] | None = None,
        max_size: int = 1024,
        slice_dir: str | None = None,
    ):
        self.slice_axis, self.max_size, self.slice_dir = slice_axis, int(max_size), slice_dir
        self.window = tuple(window) if window is not None else None

    def clear(self) -> None:
        """Remove this process's slice files (after a run), and the folder once empty."""
        if self.slice_dir and os.path.isdir(self.slice_dir):
            shutil.rmtree(os.path.join(self.slice_dir, f"rank{idist.get_rank()}"), ignore_errors=True)
            if not os.listdir(self.slice_dir):
                os.rmdir(self.slice_dir)

    def image(self, image: np.ndarray) -> np.ndarray:
        """One raw (H, W[, 3]) image prepared as the slices of a target are."""
        return shrink(scale_intensity(image, self.window), self.max_size)

    def __call__(self, case: Case) -> Target:
        volume, problem = read_target(case.image_path, self.slice_axis)
        if problem:
            return Target(case, error=problem)
        case.meta = volume.meta
        target = Target(case, volume, volume.slices.shape[:3])
        target.dicom_sources, volume.dicom_sources = _slice_sources(case.image_path, volume), None
        slices = scale_intensity(volume.slices, self.window)
        volume.slices = np.empty((len(slices), 0, 0), np.float32)
        if self.slice_dir:
            target.images = SliceFiles(os.path.join(self.slice_dir, f"rank{idist.get_rank()}"))
        for z, img in enumerate(slices):
            key = case.id if len(slices) == 1 else f"{case.id}#{z}"
            constant = float(img.max()) == float(img.min())  # e.g. padding slices of a volume: left empty
            target.keys.append(None if constant else key)
            if not constant:
                if self.slice_dir:
                    target.images.add(key, shrink(img, self.max_size))
                else:
                    target.images[key] = shrink(img, self.max_size)
        return target


class CohortDataset(Dataset):
    """The targets of a decathlon ``dataset.json`` (every case but the reference), or of a folder of images with an
    explicit reference, prepared by ``transform``.

    ``load`` reads the datalist (the synthetic demo's when neither ``dataset_dir`` nor ``image_dir`` is given) and
    returns the reference case and the class names.

    Args:
        dataset_dir: folder with ``dataset.json``; None: ``image_dir``, else the embedded synthetic demo, written to
            ``demo_dir``.
        num_images: at most this many targets (0: all).
        reference_image / reference_label: explicit reference (default: first labelled case by image name; required
            with ``image_dir``).
        transform: ``PrepareTarget``.
        image_dir / image_glob: a folder whose images (matching the glob) are the targets, no datalist needed.
        class_names: label value -> name, where no datalist names the classes.
    """

    def __init__(
        self,
        dataset_dir: str | None,
        num_images: int = 0,
        reference_image: str | None = None,
        reference_label: str | None = None,
        transform: PrepareTarget | None = None,
        demo_dir: str = "demo_data",
        image_dir: str | None = None,
        image_glob: str = "*",
        class_names: dict | None = None,
    ):
        self.prepare = transform or PrepareTarget()
        super().__init__(data=[], transform=self.prepare)
        self.dataset_dir, self.num_images, self.demo_dir = dataset_dir, num_images, demo_dir
        self.reference_image, self.reference_label = reference_image, reference_label
        self.image_dir, self.image_glob = image_dir, image_glob or "*"
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}

    def load(self) -> tuple[Case, dict[int, str]]:
        """Read the datalist: fills the dataset with the target cases; returns the reference case and class names."""
        if self.dataset_dir and self.image_dir:
            raise ValueError("give dataset_dir (a dataset.json) or image_dir (a folder of images), not both")
        if self.image_dir:
            reference, self.data = load_folder(
                self.image_dir, self.reference_image, self.reference_label, self.image_glob, self.num_images
            )
            return reference, dict(self.class_names)
        if not self.dataset_dir:
            self.dataset_dir = make_demo_dataset(self.demo_dir)
            logger.info("no dataset_dir given: running on the synthetic demo in %s", self.dataset_dir)
        reference, self.data, names = load_datalist(
            self.dataset_dir, self.num_images, self.reference_image, self.reference_label
        )
        return reference, {**names, **self.class_names}


class ImageDataset(Dataset):
    """Images to segment with a fitted model: one path or a list, or every image of a ``dataset.json`` (sorted by
    name; ``first_image`` / ``num_images`` pick a slice), prepared by ``transform``; labelled ones are scored."""

    def __init__(
        self,
        image: str | Sequence[str] | None = None,
        dataset_dir: str | None = None,
        first_image: int = 0,
        num_images: int = 0,
        transform: PrepareTarget | None = None,
    ):
        self.prepare = transform or PrepareTarget()
        super().__init__(data=[], transform=self.prepare)
        self.image, self.dataset_dir = image, dataset_dir
        self.first_image, self.num_images = int(first_image or 0), int(num_images or 0)

    def load(self) -> list[Case]:
        if self.image:
            paths = [self.image] if isinstance(self.image, str) else list(self.image)
            self.data = [Case(case_id(p), p) for p in paths]
        elif self.dataset_dir:
            reference, targets, _ = load_datalist(self.dataset_dir)
            cases = sorted([reference, *targets], key=lambda c: os.path.basename(c.image_path))[self.first_image :]
            self.data = cases[: self.num_images] if self.num_images > 0 else cases
        else:
            raise ValueError("nothing to segment: give image (a path or a list) or dataset_dir (with dataset.json)")
        return self.data
