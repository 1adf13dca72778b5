"""Handlers of the apply loop (``OneShotEvaluator``): scores and tables, overlays, classes not found."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from bundle.io import read_label_volume, to_class_index
from bundle.metrics import class_scores
from bundle.report import write_tables
from bundle.transforms import resize_label
from bundle.visualize import montage, overlay, save_overlay

__all__ = ["MetricsWriter", "OverlayWriter", "NotFoundCollector"]

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


class OverlayWriter:
    """Pictures of the first ``num_overlays`` targets (prediction, and truth where known) and a montage of them."""

    def __init__(self, output_dir: str, num_overlays: int = 8):
        self.output_dir, self.num_overlays = output_dir, int(num_overlays)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._draw)
        engine.add_event_handler(Events.COMPLETED, self._montage)

    def _start(self, engine: Engine) -> None:
        self.pictures: list[np.ndarray] = []

    def _draw(self, engine: Engine) -> None:
        if len(self.pictures) >= self.num_overlays:
            return
        out = engine.state.output
        target, label = out["target"], out["label"]
        truth = _truth(out, engine.model.class_values)
        z = int(np.argmax((label > 0).reshape(len(label), -1).sum(1)))
        key = target.keys[z]
        image = target.images[key] if key else np.zeros(label.shape[1:], np.float32)  # at the processing size
        size = tuple(image.shape[:2])

        def fit(x: np.ndarray) -> np.ndarray:
            return x if x.shape == size else resize_label(x, size)

        lab, tru = fit(label[z]), None if truth is None else fit(truth[z])
        title = target.case.id if len(label) == 1 else f"{target.case.id} slice {z}"
        picture = overlay(image, lab, tru, title=title)
        save_overlay(os.path.join(self.output_dir, "overlays", f"{target.case.id}.png"), picture)
        self.pictures.append(picture)

    def _montage(self, engine: Engine) -> None:
        if self.pictures:
            save_overlay(os.path.join(self.output_dir, "overlays", "montage.png"), montage(self.pictures))


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
