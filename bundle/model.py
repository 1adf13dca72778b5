"""The fitted one-shot model: what a cohort run learned, applied the same way to every image, saved as one file.

A run has one or more reference groups (a labelled volume whose classes are largest on different slices gives one
reference slice per group). Each group's source is fitted on its reference and the cohort; predicting an image
applies every group and gives each pixel the class with the highest logit. The cohort run, the adapted model
(``configs/infer.yaml``) and the MONAI Label app all segment through ``OneShotModel.predict``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from bundle.layout import Layout, keep_parts
from bundle.prediction import Prediction
from bundle.qc import reference_stability
from bundle.sources.base import Cohort, Source, load_source, save_source
from bundle.store import EmbeddingStore, Reference

__all__ = ["FORMAT_VERSION", "Group", "OneShotModel", "load_model_file"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 4: one fitted source tree per reference group (the source redesign)


@dataclass
class Group:
    """One reference and the classes (0-based indices into the model's classes) it is the reference for."""

    reference: Reference
    classes: list[int]
    source: Source
    state: Any


class OneShotModel:
    """Fitted sources per reference group over ``class_values`` / ``class_names``.

    Args:
        groups: the fitted groups.
        class_values / class_names: label value and name of each class, in class-index order.
        preparation: how images were prepared for the sources (``window``, ``max_size``) and SAM's ``precision``,
            applied to new images.
    """

    def __init__(
        self,
        groups: list[Group],
        class_values: Sequence[int],
        class_names: Sequence[str],
        preparation: dict[str, Any] | None = None,
    ):
        self.groups = groups
        self.class_values, self.class_names = [int(v) for v in class_values], [str(n) for n in class_names]
        self.preparation = dict(preparation or {})
        self.layouts = [Layout.of(g.reference.label, len(g.classes)) for g in groups]
        self.parts = [1] * self.num_classes
        for group, layout in zip(groups, self.layouts):
            for c, k in zip(group.classes, layout.parts):
                self.parts[c] = k

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    @classmethod
    def fit(
        cls,
        source: Source,
        references: list[tuple[Reference, list[int]]],
        cohort: Cohort,
        class_values: Sequence[int],
        class_names: Sequence[str],
        preparation: dict[str, Any] | None = None,
    ) -> "OneShotModel":
        """Fit ``source`` once per (reference, its classes) group on the cohort."""
        groups = []
        for reference, classes in references:
            if len(references) > 1:
                logger.info("fitting on reference %s for classes %s", reference.tag, [class_names[c] for c in classes])
            groups.append(Group(reference, classes, source, source.fit(reference, cohort)))
        model = cls(groups, class_values, class_names, preparation)
        for name, decision in model.decisions().items():
            logger.info("%s: served by %s (%s)", name, decision["source"], decision)
        return model

    def predict(self, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        """All classes' logits (C, H, W) for one prepared (H, W[, 3]) image; ``key`` names it in ``store``. Where a
        reference has a class inside another, the inner class's mask wins over the outer's (``Layout.nest``)."""
        if len(self.groups) == 1 and self.groups[0].classes == list(range(self.num_classes)):
            group = self.groups[0]
            pred = group.source.predict(group.state, key, image, store)
            nested = self.layouts[0].nest(pred.logits)
            return Prediction(nested, pred.iou, pred.found, pred.prompts, pred.support, pred.sources)
        out = Prediction.empty(self.num_classes, tuple(image.shape[:2]))
        out.support = torch.full((self.num_classes,), float("nan"))
        out.sources = [""] * self.num_classes
        for group, layout in zip(self.groups, self.layouts):
            pred = group.source.predict(group.state, key, image, store)
            out.logits[group.classes], out.iou[group.classes], out.found[group.classes] = (
                layout.nest(pred.logits),
                pred.iou,
                pred.found,
            )
            if pred.support is not None:
                out.support[group.classes] = pred.support.float()
            for i, c in enumerate(group.classes):
                out.sources[c] = pred.sources[i] if pred.sources else group.source.kind
        return out

    def segment(self, key: str, image: np.ndarray, store: EmbeddingStore) -> tuple[np.ndarray, Prediction]:
        """(H, W) class indices (0 = background) of one prepared image, each class with as many separate parts as its
        reference (the largest ones), and the prediction it was made from (``found``, SAM's ``iou`` per class)."""
        pred = self.predict(key, image, store)
        return keep_parts(pred.label(), self.parts, self.layouts[0].min_share), pred

    def class_sources(self) -> list[str]:
        """Per class, the name of the source that serves it (the fused choice, else the source's kind)."""
        out = [""] * self.num_classes
        for group in self.groups:
            decisions = group.source.decisions(group.state)
            for i, c in enumerate(group.classes):
                out[c] = decisions[i].source if decisions else group.source.kind
        return out

    def reference_areas(self) -> np.ndarray:
        """Per class, the share of its reference slice it covers: (C,)."""
        out = np.zeros(self.num_classes)
        for group in self.groups:
            for i, c in enumerate(group.classes):
                out[c] = float((group.reference.label == i + 1).mean())
        return out

    def reference_stability(self, store: EmbeddingStore) -> np.ndarray:
        """Per class, the ``qc.reference_stability`` of its reference: (C,)."""
        out = np.full(self.num_classes, np.nan)
        for group in self.groups:
            values = reference_stability(store, group.reference)
            for i, c in enumerate(group.classes):
                out[c] = values[i]
        return out

    def decisions(self) -> dict[str, dict[str, Any]]:
        """Per class name, the fused source's choice and measurements (empty for other sources)."""
        out = {}
        for group in self.groups:
            for c, decision in zip(group.classes, group.source.decisions(group.state)):
                out[self.class_names[c]] = vars(decision)
        return out

    def state_dict(self) -> dict[str, Any]:
        groups = [
            {
                "classes": g.classes,
                "tag": g.reference.tag,
                "reference_image": torch.from_numpy(np.ascontiguousarray(g.reference.image, dtype=np.float32)),
                "reference_label": torch.from_numpy(np.ascontiguousarray(g.reference.label, dtype=np.uint8)),
                "source": save_source(g.source, g.state),
            }
            for g in self.groups
        ]
        network = _first(groups[0]["source"], "network")
        return {
            "version": FORMAT_VERSION,
            "network": network,  # the first warping network, for Model Zoo tools (--key_in_ckpt network)
            "class_values": self.class_values,
            "class_names": self.class_names,
            "preparation": self.preparation,
            "groups": groups,
        }

    def save(self, path: str, job: str | None = None) -> str:
        """Write the model to ``path`` atomically (a temporary file, then a rename); ``job`` names the run's job."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({**self.state_dict(), "job": job}, path + ".part")
        os.replace(path + ".part", path)
        return path

    @classmethod
    def load(cls, path: str, store: EmbeddingStore, device: torch.device | str = "cpu") -> "OneShotModel":
        """A model saved by ``save``, its sources decoding with the SAM backend of ``store``."""
        state = load_model_file(path)
        groups = []
        for g in state["groups"]:
            num_classes = len(g["classes"])
            reference = Reference(
                g["reference_image"].numpy(), g["reference_label"].long().numpy(), num_classes, g["tag"]
            )
            source, fitted = load_source(g["source"], reference, store, device)
            groups.append(Group(reference, list(g["classes"]), source, fitted))
        saved = (state.get("preparation") or {}).get("precision")
        here = getattr(store.sam, "precision", None)
        if saved is not None and here is not None and saved != here:
            logger.warning(
                "%s was fitted with SAM in %s; it is applied in %s here, so its masks may differ a little from the "
                "cohort run's (sam#precision)",
                path,
                saved,
                here,
            )
        return cls(groups, state["class_values"], state["class_names"], state.get("preparation"))


def _first(tree: Any, key: str) -> Any:
    """The first value stored under ``key`` in nested dicts (depth first), or None."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _first(value, key)
            if found is not None:
                return found
    return None


def load_model_file(path: str) -> dict[str, Any]:
    """Read a saved model; a clear error when it is missing, of another kind or of another format version."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"adapted model not found: {path}. Run configs/inference.yaml on a cohort first: it saves what it "
            "learned there (config id adapted_model)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "class_values" not in state:
        raise ValueError(f"{path} is not an adapted model written by configs/inference.yaml (bundle.model)")
    version = int(state.get("version", 0))
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version}; this bundle reads version {FORMAT_VERSION}: adapt again with "
            "configs/inference.yaml"
        )
    return state
