"""The source interface: fit on the reference and the cohort, predict one image, save and load the fitted state.

A source is a recipe (its settings and the shared SAM decoder); what it learns on a cohort is the *state* that
``fit`` returns, which ``predict`` takes back. Nothing learned is kept on the source itself, so one source can be
fitted on several references of a run and each fitted state applied independently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from bundle.distributed import is_main, map_owned
from bundle.heap import trim
from bundle.prediction import Prediction
from bundle.store import EmbeddingStore, Reference

__all__ = ["Cohort", "SliceItems", "Source", "register", "save_source", "load_source", "pick_source"]


class SliceItems(Sequence):
    """(key, image) pairs whose images are read when asked for, from ``(key, slices)`` entries (``slices[key]`` gives
    the (H, W[, 3]) image, e.g. a target's ``SliceFiles``): the cohort need not hold every image in memory."""

    def __init__(self, entries: list[tuple[str, Mapping[str, np.ndarray]]]):
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        key, slices = self.entries[i]
        return key, slices[key]


@dataclass
class Cohort:
    """The images a source is fitted on: (key, (H, W[, 3]) image) pairs (a list, or ``SliceItems`` read when needed)
    and the run's embedding store.

    In a run of several processes each item has one owner (by its position), which alone encodes it and does its
    per-item work in ``map``.
    """

    items: Sequence[tuple[str, np.ndarray]]
    store: EmbeddingStore
    progress: bool = False

    def bar(self, items: Iterable, desc: str) -> Iterable:
        return tqdm(items, desc=desc, leave=False, disable=not (self.progress and is_main()))

    def map(
        self, fn: Callable[[str, np.ndarray], Any], desc: str = "", indices: Sequence[int] | None = None
    ) -> list[Any]:
        """``fn(key, image)`` for every item (or the items at ``indices``), in order; with several processes, each
        item's by its owner (its position modulo the number of processes), gathered on every process (tensors on the
        CPU). Images are read one at a time; the memory each one freed is given back (``bundle.heap.trim``)."""
        indices = range(len(self.items)) if indices is None else list(indices)

        def run(i: int) -> Any:
            out = fn(*self.items[i])
            trim()  # what the item freed goes back to the system: memory does not creep up with the cohort
            return out

        return map_owned(run, indices, lambda x: self.bar(x, desc))

    def with_store(self, store: Any) -> "Cohort":
        """The same items (and owners) with another store."""
        return Cohort(self.items, store, self.progress)


class Source(ABC):
    """Per-class SAM logits for any image of a cohort, from one labelled reference."""

    kind: str = ""

    @abstractmethod
    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> Any:
        """Learn what predicting needs from ``reference`` and the ``cohort``; returns the fitted state.

        ``classes`` (C,) bool, where given, are the classes the state will be asked for (the others may be left
        unfitted).
        """

    @abstractmethod
    def predict(self, state: Any, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        """Prediction for one (H, W[, 3]) image (``key`` names its embedding in ``store``) with a fitted state."""

    def decisions(self, state: Any) -> list[Any]:
        """Per class, what the source chose and why (a fusing source's ``Decision``); [] for a single source."""
        return []

    def supports(
        self, state: Any, key: str, image: np.ndarray, store: EmbeddingStore, pred: Prediction
    ) -> torch.Tensor | None:
        """(C,) how much the source's own locator backs each class's mask of ``pred`` for this image
        (``candidates.support``); None for a source without a locator."""
        return None

    @abstractmethod
    def state_dict(self, state: Any) -> dict[str, Any]:
        """The fitted state and the settings ``predict`` uses, as tensors and plain values."""

    @classmethod
    @abstractmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["Source", Any]:
        """A source and its fitted state rebuilt from ``state_dict`` (a predicting source: it cannot fit)."""


_KINDS: dict[str, type[Source]] = {}


def register(*kinds: str):
    """Class decorator: ``load_source`` rebuilds states saved with these kinds through this class."""

    def wrap(cls: type[Source]) -> type[Source]:
        for kind in kinds:
            _KINDS[kind] = cls
        return cls

    return wrap


def pick_source(sources: Mapping[str, Source], strategy: str) -> Source:
    """The source named ``strategy`` among a config's ``sources``; an unknown name says which ones there are."""
    if strategy not in sources:
        known = ", ".join(sorted(sources))
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {known} (the keys of `sources` in the config)")
    return sources[strategy]


def save_source(source: Source, state: Any) -> dict[str, Any]:
    """``state_dict`` tagged with the source's kind."""
    return {"kind": source.kind, **source.state_dict(state)}


def load_source(
    state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device | str = "cpu"
) -> tuple[Source, Any]:
    """The source and fitted state a ``save_source`` dict describes."""
    if state.get("kind") not in _KINDS:
        raise ValueError(f"unknown source kind {state.get('kind')!r}; known: {sorted(_KINDS)}")
    return _KINDS[state["kind"]].from_state(state, reference, store, torch.device(device))
