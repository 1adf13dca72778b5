"""The apply loop as an ignite engine: one iteration per target (segment with the fitted model, or read back what an
earlier run of the same job wrote), then write its outputs. Metrics, overlays and tables are handlers.

With several processes each segments and writes the targets it owns; rank 0 then runs the loop over all of them,
reading the label maps back, so the handlers see every target once."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine
from tqdm import tqdm

from bundle.dataset import Target
from bundle.distributed import is_main, map_owned
from bundle.heap import trim
from bundle.inferer import OneShotInferer
from bundle.io import output_name, read_label_volume, save_prediction, to_class_index
from bundle.model import OneShotModel
from bundle.seg import write_dicom_seg
from bundle.store import EmbeddingStore

__all__ = ["OneShotEvaluator", "output_paths"]

logger = logging.getLogger(__name__)


def output_paths(output_dir: str, target: Target) -> list[str]:
    """Where a target's outputs go: its label map, and a DICOM SEG for DICOM input that lines up with its files."""
    pred_dir = os.path.join(output_dir, "predictions")
    paths = [os.path.join(pred_dir, output_name(target.case))]
    if target.dicom_sources is not None:
        paths.append(os.path.join(pred_dir, f"{target.case.id}_seg.dcm"))
    return paths


class OneShotEvaluator(Engine):
    """Segments prepared targets with a fitted model and writes each one's outputs.

    ``engine.state.output`` after each iteration: ``target``, ``label`` (Z, H, W) class indices, ``missing``
    (class indices no prompt was found for, per slice key) and ``signals`` (the inferer's review signals; empty for a
    target read back from an earlier run). Handlers (``val_handlers``) attach to it.

    Args:
        inferer: applies the model to a target.
        output_dir: ``predictions/`` go here.
        val_handlers: objects with ``attach(engine)`` (``bundle.handlers``).
        postprocessing: the inferer's post-processing (kept here for bundle tools that look it up).
        progress: progress bar.
    """

    def __init__(
        self,
        inferer: OneShotInferer,
        output_dir: str,
        val_handlers: Sequence[Any] = (),
        postprocessing: Any | None = None,
        progress: bool = False,
    ):
        super().__init__(self._step)
        self.inferer, self.output_dir, self.postprocessing = inferer, output_dir, postprocessing
        self.model: OneShotModel | None = None
        self.store: EmbeddingStore | None = None
        self.errors: list[dict] = []
        self.known: dict[str, tuple[dict, dict]] = {}  # per target id segmented by another process: missing, signals
        self.progress = progress
        for handler in val_handlers or ():
            handler.attach(self)
        if progress:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False, desc="segmenting").attach(self)

    def _step(self, engine: Engine, target: Target) -> dict[str, Any]:
        if target.done:
            path = output_paths(self.output_dir, target)[0]
            label = to_class_index(read_label_volume(path, target.volume), self.model.class_values)
            missing, signals = self.known.get(target.case.id, ({}, {}))
            return {"target": target, "label": label, "missing": missing, "signals": signals}
        label, missing, signals = self._segment(target)
        return {"target": target, "label": label, "missing": missing, "signals": signals}

    def _segment(self, target: Target) -> tuple[np.ndarray, dict, dict]:
        """Segment one target and write its outputs: (Z, H, W) class indices, classes not found, review signals."""
        model, values = self.model, np.array([0, *self.model.class_values], dtype=np.int64)
        paths = output_paths(self.output_dir, target)
        label, missing, signals = self.inferer(target, model, self.store)
        trim()  # the target's freed working memory goes back to the system (flat memory over a long cohort)
        save_prediction(values[label], paths[0], target.volume)
        if target.dicom_sources is not None:
            try:
                names = dict(zip(model.class_values, model.class_names))
                write_dicom_seg(values[label], target.dicom_sources, names, paths[1])
            except Exception as e:  # noqa: BLE001 - one output that cannot be written never stops the others
                logger.error("DICOM SEG of %s not written: %s", target.case.id, e)
                self.errors.append({"id": target.case.id, "image": target.case.image_path, "error": f"SEG: {e}"})
        return label, missing, signals

    def evaluate(
        self, model: OneShotModel, store: EmbeddingStore, targets: list[Target], errors: list[dict] | None = None
    ) -> None:
        """Run over ``targets`` (``errors``: inputs that could not be read, for the tables); the caller times it."""
        self.model, self.store, self.errors = model, store, list(errors or [])
        self.known = {}
        if idist.get_world_size() > 1:
            self._segment_owned(targets)
            if not is_main():
                return
        self.run(targets, max_epochs=1)

    def _segment_owned(self, targets: list[Target]) -> None:
        """Several processes: segment and write the targets this one owns (``map_owned``), sharing what the tables need
        (classes not found, review signals, errors); every target is then done (its label map on disk)."""

        def segment(i: int) -> tuple[dict, dict, list[dict]] | None:
            if targets[i].done:
                return None
            before = len(self.errors)
            _, missing, signals = self._segment(targets[i])
            errors = self.errors[before:]
            del self.errors[before:]
            return missing, signals, errors

        def bar(positions: list[int]) -> Any:
            return tqdm(positions, desc="segmenting", leave=False, disable=not (self.progress and is_main()))

        for target, out in zip(targets, map_owned(segment, range(len(targets)), bar)):
            if out is not None:
                self.known[target.case.id] = (out[0], out[1])
                self.errors.extend(out[2])
            target.done = True
