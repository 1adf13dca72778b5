"""The cohort run: read and check the reference, read the targets, segment, post-process, write and score."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from bundle.adapted import save_adapted
from bundle.demo import make_demo_dataset
from bundle.dicom import read_dicom_datasets, read_dicom_series, write_dicom_seg
from bundle.inferer import OneShotInferer
from bundle.io import (
    Case,
    InvalidReferenceError,
    Volume,
    check_target,
    load_datalist,
    output_name,
    read_label_volume,
    read_target,
    read_volume,
    save_prediction,
    to_class_index,
)
from bundle.metrics import class_scores, summarize
from bundle.report import write_json, write_tables
from bundle.transforms import resize_label, scale_intensity, shrink
from bundle.visualize import montage, overlay, save_overlay

__all__ = ["OneShotSegmentation", "Reference", "check_reference", "check_target"]

logger = logging.getLogger(__name__)


@dataclass
class Reference:
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
) -> tuple[list[Reference], list[int]]:
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
        label = read_label_volume(case.label_path, volume)
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
        refs.append(Reference(image[z], group, classes, z))
    return refs, class_values


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[2]}x{shape[1]} px" if shape[0] == 1 else f"{shape[0]} slices of {shape[2]}x{shape[1]} px"


def dicom_order(path: str, volume: Volume) -> int | None:
    """How the DICOM files behind ``volume`` line up with its slices: 1 (as read by ``read_dicom_datasets``), -1
    (reversed), or None when they cannot be matched (no DICOM SEG is written then)."""
    try:
        _, pixels = read_dicom_series(path)
    except ValueError as e:
        logger.warning("no DICOM SEG for %s (NIfTI only): %s", path, e)
        return None
    raw = volume.slices
    scale = max(float(raw.max() - raw.min()), 1e-6)
    for step in (1, -1):
        # decoders of compressed files may differ by a grey level or two: compare within 1 % of the range
        if pixels.shape == raw.shape and float(np.abs(pixels[::step] - raw).mean()) < 0.01 * scale:
            return step
    logger.warning("no DICOM SEG for %s (NIfTI only): its slices do not match the files' pixel data", path)
    return None


@dataclass
class Target:
    """A target input read and cut into slices; ``keys`` name the slices the inferer segments (None: left empty)."""

    case: Case
    volume: Volume  # geometry only: the full-resolution pixels are dropped once the slices are made
    shape: tuple[int, int, int] = (0, 0, 0)  # (Z, H, W) of the input
    keys: list[str | None] = field(default_factory=list)
    dicom_order: int | None = None  # set for DICOM input whose files line up with the slices: a SEG is written
    done: bool = False


class OneShotSegmentation:
    """Segments every target of a dataset from its one labelled reference and writes the results.

    Args:
        inferer: the one-shot inferer (strategy, SAM backend, warping trainer).
        output_dir: where predictions, metrics, summary and overlays go.
        dataset_dir: folder with a decathlon ``dataset.json``; None runs the synthetic demo.
        reference_image / reference_label: explicit reference (default: first labelled case by image name).
        num_images: at most this many targets (None or 0: all).
        postprocessing: callable on a (1, H, W) label tensor (MONAI transforms), or None.
        num_overlays: how many overlay pictures to write.
        settings: resolved settings recorded in the summary (and in the resume fingerprint).
        slice_axis: spatial axis (of the MONAI array: 0 x, 1 y, 2 z) 3D inputs are cut along.
        reference_slice: the slice of a labelled reference volume to use (default: per class, its largest).
        window: CT-style (level, width) intensity window; None: percentile clipping for non-8-bit images.
        max_size: slices with a longer side are processed at this size; outputs are at the input's size.
        resume: reuse the checkpoints and finished predictions of an earlier run of the same job in ``output_dir``.
        fail_on_errors: exit with status 1 (after writing everything) when any target failed.
        adapted_model: where to save what the run learned for new single images (``bundle.adapted``); None: not saved.
    """

    def __init__(
        self,
        inferer: OneShotInferer,
        output_dir: str,
        dataset_dir: str | None = None,
        reference_image: str | None = None,
        reference_label: str | None = None,
        num_images: int | None = None,
        postprocessing: Callable | None = None,
        num_overlays: int = 8,
        settings: dict[str, Any] | None = None,
        slice_axis: int = -1,
        reference_slice: int | None = None,
        window: tuple[float, float] | None = None,
        max_size: int = 1024,
        resume: bool = True,
        fail_on_errors: bool = True,
        adapted_model: str | None = None,
    ):
        self.inferer = inferer
        self.output_dir = output_dir
        self.dataset_dir = dataset_dir
        self.reference_image, self.reference_label = reference_image, reference_label
        self.num_images = num_images
        self.postprocessing = postprocessing
        self.num_overlays = num_overlays
        self.settings = settings or {}
        self.slice_axis, self.reference_slice = slice_axis, reference_slice
        self.window = tuple(window) if window is not None else None
        self.max_size, self.resume, self.fail_on_errors = max_size, resume, fail_on_errors
        self.adapted_model = adapted_model

    def run(self) -> dict[str, Any]:
        start = time.time()
        os.makedirs(self.output_dir, exist_ok=True)
        dataset_dir = self.dataset_dir
        if not dataset_dir:
            dataset_dir = make_demo_dataset(os.path.join(self.output_dir, "demo_data"))
            logger.info("no dataset_dir given: running on the synthetic demo in %s", dataset_dir)
        reference, cases, names = load_datalist(
            dataset_dir, self.num_images, self.reference_image, self.reference_label
        )
        refs, class_values = check_reference(
            reference, sorted(names) or None, self.slice_axis, self.reference_slice, self.window
        )
        class_names = [names.get(v, f"class_{v}") for v in class_values]
        resuming = self._prepare_resume(reference, cases)

        errors: list[dict[str, str]] = []
        targets: list[Target] = []
        images: dict[str, np.ndarray] = {}
        for case in self._bar(cases, "reading"):
            volume, problem = read_target(case.image_path, self.slice_axis)
            if problem:
                logger.warning("skipping %s: %s", case.image_path, problem)
                errors.append({"id": case.id, "image": case.image_path, "error": problem})
                continue
            case.meta = volume.meta
            target = Target(case, volume, volume.slices.shape[:3])
            target.dicom_order = dicom_order(case.image_path, volume) if volume.kind == "dicom" else None
            target.done = resuming and all(os.path.exists(p) for p in self._outputs(target))
            slices = scale_intensity(volume.slices, self.window)
            volume.slices = np.empty((len(slices), 0, 0), np.float32)
            for z, img in enumerate(slices):
                key = case.id if len(slices) == 1 else f"{case.id}#{z}"
                constant = float(img.max()) == float(img.min())  # e.g. padding slices of a volume: left empty
                target.keys.append(None if constant else key)
                if not constant:
                    images[key] = shrink(img, self.max_size)
            targets.append(target)
        if not targets:
            raise RuntimeError(f"no readable target image in {dataset_dir} ({len(errors)} failed)")
        if any(t.done for t in targets):
            logger.info("resuming: %d of %d targets already finished", sum(t.done for t in targets), len(targets))

        slices = self._segment(refs, class_values, targets, images)
        if self.adapted_model and len(refs) == 1:  # adapt once, infer many: bundle/adapted.py
            ref = refs[0]
            image, label = shrink(ref.image, self.max_size), shrink(ref.label, self.max_size, nearest=True)
            save_adapted(self.adapted_model, self.inferer, image, label, class_values, class_names, self.settings)
        elif self.adapted_model:
            logger.warning("no adapted model saved: this run used %d reference slices (one is supported)", len(refs))
        summary = self._finish(targets, slices, images, class_values, class_names, errors, reference, start)
        if errors and self.fail_on_errors:
            raise SystemExit(
                f"{len(errors)} of {len(errors) + len(targets)} targets failed: see {self.output_dir}/errors.csv"
            )
        return summary

    def _bar(self, items, desc: str):
        return tqdm(items, desc=desc, leave=False, disable=not getattr(self.inferer, "progress", False))

    # resuming ------------------------------------------------------------------------------------------------------
    def _fingerprint(self, reference: Case, cases: list[Case]) -> str:
        def stat(path: str | None) -> list:
            if not path or not os.path.exists(path):
                return [path]
            st = os.stat(path)
            return [os.path.abspath(path), st.st_size, st.st_mtime_ns]

        job = {
            "settings": self.settings,
            "reference": stat(reference.image_path) + stat(reference.label_path),
            "targets": [[c.id, *stat(c.image_path)] for c in cases],
            "io": [self.slice_axis, self.reference_slice, self.window, self.max_size],
        }
        return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()

    def _prepare_resume(self, reference: Case, cases: list[Case]) -> bool:
        """True when ``output_dir`` holds an unfinished or finished run of this very job; else start afresh there."""
        path = os.path.join(self.output_dir, "run_state.json")
        fingerprint = self._fingerprint(reference, cases)
        same = False
        if self.resume and os.path.exists(path):
            with open(path) as f:
                same = json.load(f).get("fingerprint") == fingerprint
        trainer = getattr(self.inferer, "trainer", None)
        if not same:
            if os.path.exists(path):
                logger.info("%s holds a different job (settings or inputs changed): starting afresh", self.output_dir)
            if trainer is not None:
                trainer.clear_checkpoints()
            write_json(path, {"fingerprint": fingerprint})
        if trainer is not None:
            trainer.resumable = same
        return same

    def _outputs(self, target: Target) -> list[str]:
        pred_dir = os.path.join(self.output_dir, "predictions")
        paths = [os.path.join(pred_dir, output_name(target.case))]
        if target.dicom_order is not None:
            paths.append(os.path.join(pred_dir, f"{target.case.id}_seg.dcm"))
        return paths

    # segmentation --------------------------------------------------------------------------------------------------
    def _segment(
        self, refs: list[Reference], class_values: list[int], targets: list[Target], images: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Label map (class indices, processing size) per slice key, every reference group merged by SAM logit."""
        items = [(k, images[k]) for t in targets for k in t.keys if k is not None]
        skip = {k for t in targets if t.done for k in t.keys if k is not None}
        best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        decisions, self.not_found = {}, []
        for ref in refs:
            if len(refs) > 1:
                logger.info(
                    "reference slice %d for classes %s", ref.slice_index, [class_values[c] for c in ref.classes]
                )
            predictions = self.inferer(
                shrink(ref.image, self.max_size),
                shrink(ref.label, self.max_size, nearest=True),
                len(ref.classes),
                items,
                skip=skip,
                tag="" if len(refs) == 1 else f"_slice{ref.slice_index}",
            )
            for name, d in getattr(self.inferer, "decisions", {}).items():
                decisions[f"class_{class_values[ref.classes[int(name.split('_')[-1]) - 1]]}"] = d
            cls = torch.tensor([c + 1 for c in ref.classes])
            for (key, _), pred in zip(items, predictions):
                if pred is None:
                    continue
                missing = [class_values[ref.classes[c]] for c in np.flatnonzero(~pred.found.numpy())]
                if missing:
                    self.not_found.append({"id": key, "classes": missing})
                score, idx = pred.logits.max(0)
                label = torch.where(score > 0, cls[idx], 0)
                if key in best:  # several reference groups: each pixel keeps the class with the highest logit
                    prev_score, prev = best[key]
                    take = score > prev_score
                    label, score = torch.where(take, label, prev), torch.maximum(score, prev_score)
                best[key] = (score, label)
        self.decisions = decisions
        return {k: v[1].numpy().astype(np.int64) for k, v in best.items()}

    def _finish(self, targets, slices, images, class_values, class_names, errors, reference, start) -> dict[str, Any]:
        values = np.array([0, *class_values], dtype=np.int64)
        rows, pictures = [], []
        for k, t in enumerate(self._bar(targets, "writing")):
            paths = self._outputs(t)
            vol = t.volume
            if t.done:
                label = to_class_index(read_label_volume(paths[0], vol), class_values)
            else:
                label = np.zeros(t.shape, np.int64)
                for z, key in enumerate(t.keys):
                    if key is None:
                        continue
                    lab = slices[key]
                    if self.postprocessing is not None:
                        lab = np.asarray(self.postprocessing(torch.from_numpy(lab)[None]))[0].astype(np.int64)
                    label[z] = lab if lab.shape == label.shape[1:] else resize_label(lab, label.shape[1:])
                save_prediction(values[label], paths[0], vol)
                if t.dicom_order is not None:
                    sources = read_dicom_datasets(t.case.image_path)[:: t.dicom_order]
                    write_dicom_seg(values[label], sources, dict(zip(class_values, class_names)), paths[1])
            truth = None
            if t.case.label_path and os.path.exists(t.case.label_path):
                try:
                    truth = to_class_index(read_label_volume(t.case.label_path, vol), class_values)
                except Exception as e:  # noqa: BLE001
                    logger.warning("label of %s unreadable, not scored: %s", t.case.id, e)
            if truth is not None and truth.shape == label.shape:
                rows.append({"id": t.case.id, **class_scores(label, truth, len(class_values))})
            if k < self.num_overlays:
                z = int(np.argmax((label > 0).reshape(len(label), -1).sum(1)))
                image = images[t.keys[z]] if t.keys[z] else np.zeros_like(shrink(label[z], self.max_size, True))
                lab = shrink(label[z], self.max_size, nearest=True)
                tru = None if truth is None or truth.shape != label.shape else shrink(truth[z], self.max_size, True)
                title = t.case.id if len(label) == 1 else f"{t.case.id} slice {z}"
                pic = overlay(image, lab, tru, title=title)
                save_overlay(os.path.join(self.output_dir, "overlays", f"{t.case.id}.png"), pic)
                pictures.append(pic)
        if pictures:
            save_overlay(os.path.join(self.output_dir, "overlays", "montage.png"), montage(pictures))
        seconds = time.time() - start
        extra = {"not_found": self.not_found, "strategy_decisions": dict(self.decisions)}
        summary = self._write(rows, errors, class_names, len(targets), seconds, reference, extra)
        self._print(summary)
        return summary

    def _write(self, rows, errors, class_names, num_images, seconds, reference, extra) -> dict[str, Any]:
        write_tables(self.output_dir, rows, errors, class_names)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        if torch.cuda.is_available():
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
        summary = {
            **summarize(rows, class_names),
            "num_images": num_images,
            "num_scored": len(rows),
            "num_failed": len(errors),
            "reference": {"image": reference.image_path, "label": reference.label_path},
            "seconds_total": round(seconds, 2),
            "seconds_per_image": round(seconds / max(num_images, 1), 3),
            "peak_memory_mb": round(peak, 1),
            "seconds_by_stage": dict(getattr(self.inferer, "timings", {})),
            **extra,
            "settings": self.settings,
        }
        write_json(os.path.join(self.output_dir, "summary.json"), summary)
        return summary

    @staticmethod
    def _print(summary: dict[str, Any]) -> None:
        lines = [f"one-shot segmentation of {summary['num_images']} images ({summary['num_failed']} failed)"]
        for name, dice in summary["per_class"].items():
            lines.append(f"  {name:<20s} Dice {dice:6.2f}  IoU {summary['per_class_iou'][name]:6.2f}")
        if summary["num_scored"]:
            lines.append(f"  {'mean':<20s} Dice {summary['dice_mean']:6.2f}  IoU {summary['iou_mean']:6.2f}")
        lines.append(
            f"  {summary['seconds_total']:.1f} s in all, {summary['seconds_per_image']:.2f} s per image, "
            f"peak memory {summary['peak_memory_mb']:.0f} MB"
        )
        print("\n".join(lines), flush=True)
