"""The cohort run: read and check the reference, read the targets, segment, post-process, write and score."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import resource
import time
from typing import Any, Callable

import numpy as np
import torch

from bundle.adapted import save_adapted
from bundle.demo import make_demo_dataset
from bundle.inferer import OneShotInferer
from bundle.io import (
    Case,
    InvalidReferenceError,
    load_datalist,
    output_name,
    read_image,
    read_label,
    save_label,
    to_class_index,
)
from bundle.metrics import class_scores, summarize
from bundle.visualize import montage, overlay, save_overlay

__all__ = ["OneShotSegmentation", "check_reference", "check_target"]

logger = logging.getLogger(__name__)

MIN_SIZE = 32


def check_reference(case: Case, class_values: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Read the reference and fail with one clear message naming the file when it cannot serve as a reference.

    Returns the image, the label and the label values of the classes (sorted, background 0 excluded).
    """
    if not os.path.exists(case.image_path):
        raise InvalidReferenceError(f"reference image not found: {case.image_path}")
    if not case.label_path:
        raise InvalidReferenceError(f"reference image {case.image_path} has no label map")
    if not os.path.exists(case.label_path):
        raise InvalidReferenceError(f"reference label not found: {case.label_path}")
    try:
        image, _ = read_image(case.image_path)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported the same way
        raise InvalidReferenceError(f"reference image {case.image_path} cannot be read: {e}") from e
    try:
        label = read_label(case.label_path)
    except Exception as e:  # noqa: BLE001
        raise InvalidReferenceError(f"reference label {case.label_path} cannot be read: {e}") from e
    if image.shape[:2] != label.shape:
        raise InvalidReferenceError(
            f"reference label {case.label_path} is {label.shape[1]}x{label.shape[0]} px but the image "
            f"{case.image_path} is {image.shape[1]}x{image.shape[0]} px"
        )
    present = sorted(int(v) for v in np.unique(label) if v != 0)
    if not present:
        raise InvalidReferenceError(f"reference label {case.label_path} is empty (no foreground pixel)")
    problem = check_target(image)
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
    return image, label, class_values or present


def check_target(image: np.ndarray) -> str | None:
    """Why an image cannot be segmented (too small, non-finite, constant), or None."""
    if min(image.shape[:2]) < MIN_SIZE:
        return f"image is {image.shape[1]}x{image.shape[0]} px, smaller than {MIN_SIZE} px"
    if not np.isfinite(image).all():
        return "image has non-finite values"
    if float(image.max()) == float(image.min()):
        return "image is constant"
    return None


class OneShotSegmentation:
    """Segments every target of a dataset from its one labelled reference and writes the results.

    Args:
        inferer: the one-shot inferer (strategy, SAM backend, warping trainer).
        output_dir: where predictions, metrics, summary and overlays go.
        dataset_dir: folder with a decathlon ``dataset.json``; None runs the synthetic demo.
        reference_image / reference_label: explicit reference (default: first labelled case by image name).
        num_images: at most this many targets (None or 0: all).
        postprocessing: callable on a (1, H, W) one-hot-free label tensor (MONAI transforms), or None.
        num_overlays: how many overlay pictures to write.
        settings: resolved settings recorded in the summary.
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
        self.adapted_model = adapted_model

    def run(self) -> dict[str, Any]:
        start = time.time()
        os.makedirs(self.output_dir, exist_ok=True)
        dataset_dir = self.dataset_dir
        if not dataset_dir:
            dataset_dir = make_demo_dataset(os.path.join(self.output_dir, "demo_data"))
            logger.info("no dataset_dir given: running on the synthetic demo in %s", dataset_dir)
        reference, targets, names = load_datalist(
            dataset_dir, self.num_images, self.reference_image, self.reference_label
        )
        ref_image, ref_label, class_values = check_reference(reference, sorted(names) or None)
        class_names = [names.get(v, f"class_{v}") for v in class_values]
        ref_index = to_class_index(ref_label, class_values)

        errors: list[dict[str, str]] = []
        loaded: list[tuple[Case, np.ndarray]] = []
        for case in targets:
            try:
                image, meta = read_image(case.image_path)
                problem = check_target(image)
            except Exception as e:  # noqa: BLE001 - an unreadable target is reported, the run goes on
                problem = f"cannot be read: {e}"
            if problem:
                logger.warning("skipping %s: %s", case.image_path, problem)
                errors.append({"id": case.id, "image": case.image_path, "error": problem})
                continue
            case.meta = meta
            loaded.append((case, image))
        if not loaded:
            raise RuntimeError(f"no readable target image in {dataset_dir} ({len(errors)} failed)")

        predictions = self.inferer(ref_image, ref_index, len(class_values), [(c.id, img) for c, img in loaded])

        values = np.array([0, *class_values], dtype=np.int64)
        rows, pictures, not_found = [], [], []
        pred_dir = os.path.join(self.output_dir, "predictions")
        for k, ((case, image), pred) in enumerate(zip(loaded, predictions)):
            label = pred.label()
            if self.postprocessing is not None:
                label = np.asarray(self.postprocessing(torch.from_numpy(label)[None]))[0].astype(np.int64)
            save_label(values[label], os.path.join(pred_dir, output_name(case)), case.meta)
            truth = None
            if case.label_path and os.path.exists(case.label_path):
                try:
                    truth = to_class_index(read_label(case.label_path), class_values)
                except Exception as e:  # noqa: BLE001
                    logger.warning("label of %s unreadable, not scored: %s", case.id, e)
            missing = [n for n, f in zip(class_names, pred.found.tolist()) if not f]
            if missing:
                not_found.append({"id": case.id, "classes": missing})
            if truth is not None and truth.shape == label.shape:
                scores = class_scores(label, truth, len(class_values))
                rows.append({"id": case.id, **scores})
            if k < self.num_overlays:
                pic = overlay(image, label, truth, title=case.id)
                save_overlay(os.path.join(self.output_dir, "overlays", f"{case.id}.png"), pic)
                pictures.append(pic)
        if pictures:
            save_overlay(os.path.join(self.output_dir, "overlays", "montage.png"), montage(pictures))
        if self.adapted_model:  # adapt once, infer many: bundle/adapted.py
            save_adapted(
                self.adapted_model, self.inferer, ref_image, ref_index, class_values, class_names, self.settings
            )
        seconds = time.time() - start
        extra = {"not_found": not_found, "strategy_decisions": dict(getattr(self.inferer, "decisions", {}))}
        summary = self._write(rows, errors, class_names, len(loaded), seconds, reference, extra)
        self._print(summary)
        return summary

    def _write(self, rows, errors, class_names, num_images, seconds, reference, extra) -> dict[str, Any]:
        with open(os.path.join(self.output_dir, "metrics.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id"] + [f"dice_{n}" for n in class_names] + [f"iou_{n}" for n in class_names])
            for r in rows:
                writer.writerow([r["id"]] + [_fmt(v) for v in r["dice"]] + [_fmt(v) for v in r["iou"]])
        if errors:
            with open(os.path.join(self.output_dir, "errors.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["id", "image", "error"])
                writer.writeheader()
                writer.writerows(errors)
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
        tmp = os.path.join(self.output_dir, "summary.json.part")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2, default=str)
        os.replace(tmp, os.path.join(self.output_dir, "summary.json"))
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


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
