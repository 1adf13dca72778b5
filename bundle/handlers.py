"""Handlers of the apply loop (``OneShotEvaluator``): scores and tables, review flags, overlays, classes not found."""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from bundle.evaluator import output_paths
from bundle.io import read_label_volume, to_class_index
from bundle.metrics import class_scores
from bundle.qc import REVIEW_BELOW, area_fractions, confidence, flag_check
from bundle.report import write_qc, write_tables
from bundle.transforms import resize_label
from bundle.visualize import legend, montage, overlay, save_overlay

__all__ = ["MetricsWriter", "ReviewFlags", "OverlayWriter", "NotFoundCollector"]

logger = logging.getLogger(__name__)


def _truth(output: dict[str, Any], class_values: list[int]) -> np.ndarray | None:
    """The target's ground truth as class indices (Z, H, W), or None when it has none (or it is unreadable)."""
    target = output["target"]
    path = target.case.label_path
    if not path or not os.path.exists(path):
        return None
    if "truth" not in output:
        try:
            output["truth"] = to_class_index(read_label_volume(path, target.volume), class_values)
        except Exception as e:  # noqa: BLE001 - an unreadable label is reported, not fatal
            logger.warning("label of %s unreadable, not scored: %s", target.case.id, e)
            output["truth"] = None
    truth = output["truth"]
    return truth if truth is not None and truth.shape == output["label"].shape else None


class MetricsWriter:
    """Dice and IoU per target and class where a label exists (``engine.state.rows``); ``metrics.csv`` and
    ``errors.csv`` (the inputs that could not be read, ``engine.errors``) at the end."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        engine.state.rows = []

    def _score(self, engine: Engine) -> None:
        out, values = engine.state.output, engine.model.class_values
        truth = _truth(out, values)
        if truth is not None:
            engine.state.rows.append({"id": out["target"].case.id, **class_scores(out["label"], truth, len(values))})

    def _write(self, engine: Engine) -> None:
        write_tables(self.output_dir, engine.state.rows, engine.errors, engine.model.class_names)


def _most_common(names: np.ndarray | None, num_classes: int) -> list[str]:
    """Per class, the source that served most slices of a target, from (S, C) names ('' where unknown)."""
    if names is None or not len(names):
        return [""] * num_classes
    return [Counter(col).most_common(1)[0][0] for col in np.asarray(names).reshape(-1, num_classes).T]


class ReviewFlags:
    """Which targets a person should check (``bundle.qc``): per target and class the serving source, SAM's predicted
    IoU, the stability of its outline (and of the reference's), the locator's support, whether it was found, its
    area relative to the reference's, a confidence and ``needs_review``.

    At the end: ``qc.csv`` (least confident targets first), ``engine.state.review`` (target ids, least confident
    first) and ``engine.state.review_summary`` (how many to review; where labels exist, how many of the targets with
    mean Dice below 0.5 were flagged and how many flagged ones are below it).
    """

    def __init__(self, output_dir: str, review_below: float = REVIEW_BELOW):
        self.output_dir, self.review_below = output_dir, float(review_below)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self.ids: list[str] = []
        self.signals: dict[str, list[np.ndarray]] = {"iou": [], "stability": [], "support": [], "area": []}
        self.sources: list[list[str]] = []

    def _collect(self, engine: Engine) -> None:
        out, num_classes = engine.state.output, engine.model.num_classes
        self.ids.append(out["target"].case.id)
        for name in ("iou", "stability", "support"):
            values = out["signals"].get(name)
            with np.errstate(all="ignore"), warnings.catch_warnings():  # a class found on no slice: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.full(num_classes, np.nan) if values is None or not len(values) else np.nanmean(values, 0)
            self.signals[name].append(mean)
        self.signals["area"].append(area_fractions(out["label"], num_classes))
        self.sources.append(_most_common(out["signals"].get("source"), num_classes))

    def _write(self, engine: Engine) -> None:
        model = engine.model
        cohort = model.class_sources()
        sources = [[s or cohort[c] for c, s in enumerate(row)] for row in self.sources]
        iou, stable, support, area = (
            np.array(self.signals[k]).reshape(-1, model.num_classes) for k in ("iou", "stability", "support", "area")
        )
        itself = np.array(sources, dtype=object).reshape(iou.shape) == "registration"  # the warped label, not SAM
        iou[itself], stable[itself] = np.nan, np.nan
        area = area / np.maximum(model.reference_areas(), 1e-12)
        found = area > 0
        anchor = model.reference_stability(engine.store) if np.isfinite(stable).any() else None  # else: no SAM
        conf = confidence(iou, area, found, support, stable, anchor)
        image_conf = conf.min(1) if conf.size else np.zeros(0)
        order = np.argsort(image_conf, kind="stable")
        dice = {r["id"]: r["dice"] for r in getattr(engine.state, "rows", [])}
        rows = []
        for i in order:
            for c, name in enumerate(model.class_names):
                d = dice.get(self.ids[i], [None] * model.num_classes)[c]
                rows.append(
                    {
                        "id": self.ids[i],
                        "class": name,
                        "source": sources[i][c],
                        "sam_iou": iou[i, c],
                        "sam_stability": stable[i, c],
                        "reference_stability": None if anchor is None else anchor[c],
                        "locator_support": support[i, c],
                        "found": bool(found[i, c]),
                        "area_vs_reference": area[i, c],
                        "confidence": conf[i, c],
                        "needs_review": bool(conf[i, c] < self.review_below),
                        "dice": d,
                    }
                )
        write_qc(self.output_dir, rows)
        engine.state.qc_rows = rows
        flagged = image_conf < self.review_below
        engine.state.review = [self.ids[i] for i in order]
        engine.state.confidence = {self.ids[i]: float(image_conf[i]) for i in order}
        engine.state.review_summary = {
            "num_to_review": int(flagged.sum()),
            "to_review": [self.ids[i] for i in order if flagged[i]],
            **flag_check(self.ids, flagged, dice),
        }
        if flagged.any():
            logger.info("%d of %d images need review (qc.csv, least confident first)", flagged.sum(), len(flagged))


class OverlayWriter:
    """Pictures of ``num_overlays`` targets, the least confident first where ``ReviewFlags`` ran (else by name):
    prediction, truth where known, confidence; and a montage of them with a class legend."""

    def __init__(self, output_dir: str, num_overlays: int = 8):
        self.output_dir, self.num_overlays = output_dir, int(num_overlays)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep)
        engine.add_event_handler(Events.COMPLETED, self._draw_all)

    def _start(self, engine: Engine) -> None:
        self.targets: dict[str, Any] = {}

    def _keep(self, engine: Engine) -> None:
        target = engine.state.output["target"]
        self.targets[target.case.id] = target  # held by the run anyway; labels are read back from disk

    def _draw_all(self, engine: Engine) -> None:
        order = getattr(engine.state, "review", None) or sorted(self.targets)
        confidence = getattr(engine.state, "confidence", {})
        pictures = []
        for case_id in order[: self.num_overlays]:
            target = self.targets[case_id]
            values = engine.model.class_values
            label = to_class_index(read_label_volume(output_paths(self.output_dir, target)[0], target.volume), values)
            pictures.append(self._draw(target, label, _truth({"target": target, "label": label}, values), confidence))
        if pictures:
            sheet = legend(montage(pictures), engine.model.class_names)
            save_overlay(os.path.join(self.output_dir, "overlays", "montage.png"), sheet)

    def _draw(self, target: Any, label: np.ndarray, truth: np.ndarray | None, confidence: dict) -> np.ndarray:
        z = int(np.argmax((label > 0).reshape(len(label), -1).sum(1)))
        key = target.keys[z]
        image = target.images[key] if key else np.zeros(label.shape[1:], np.float32)  # at the processing size
        size = tuple(image.shape[:2])

        def fit(x: np.ndarray) -> np.ndarray:
            return x if x.shape == size else resize_label(x, size)

        lab, tru = fit(label[z]), None if truth is None else fit(truth[z])
        title = target.case.id if len(label) == 1 else f"{target.case.id} slice {z}"
        if target.case.id in confidence:
            title += f"  conf {confidence[target.case.id]:.2f}"
        picture = overlay(image, lab, tru, title=title)
        save_overlay(os.path.join(self.output_dir, "overlays", f"{target.case.id}.png"), picture)
        return picture


class NotFoundCollector:
    """Per slice, the classes no prompt could be made for (``engine.state.not_found``: id and class values)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)

    def _start(self, engine: Engine) -> None:
        engine.state.not_found = []

    def _collect(self, engine: Engine) -> None:
        values = engine.model.class_values
        for key, classes in engine.state.output["missing"].items():
            engine.state.not_found.append({"id": key, "classes": [values[c] for c in classes]})
