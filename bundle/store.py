"""Embeddings computed once per run: the cohort's, keyed by image, and each reference's in a slot of its own.

A ``Reference`` carries its own slot, so two references (e.g. two slices of a labelled volume) can never share
an embedding or matching features. Target embeddings live in memory or, with ``directory``, on disk beyond a
bounded in-memory cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from bundle.features import sam_patch_features
from bundle.layout import part_counts
from bundle.sam import Embedding, SamBackend
from bundle.transforms import one_hot

__all__ = ["Clock", "EmbeddingStore", "Reference"]


class Clock:
    """Seconds spent per stage of a run, added up, each stage's own: a stage timed inside another (an encoding inside
    the classifier's fitting) counts for itself only; and the process's peak resident memory (MB) when each stage last
    ended (which stage the run's peak memory is reached in)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self._spans: list[tuple[float, float]] = []  # the outermost timed spans so far, (start, end)

    def add(self, stage: str, start: float) -> None:
        """Time ``stage`` from ``start`` to now, less the stages timed within it."""
        end = time.time()
        inner = [span for span in self._spans if span[0] >= start]
        own = end - start - sum(b - a for a, b in inner)
        self._spans = [span for span in self._spans if span[0] < start] + [(start, end)]
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + own, 2)
        self.peak_mb[stage] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


@dataclass(eq=False)
class Reference:
    """One labelled reference image: (H, W[, 3]) image, (H, W) class indices 1..``num_classes``, its own cache.

    ``tag`` names what is fitted on it (checkpoints) when a run has several references.
    """

    image: np.ndarray
    label: np.ndarray
    num_classes: int
    tag: str = ""
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def onehot(self) -> torch.Tensor:
        """(C + 1, H, W) one-hot label, background first."""
        return one_hot(torch.from_numpy(self.label), self.num_classes)

    @property
    def parts(self) -> list[int]:
        """Per class, its separate parts in the label (both lungs as one class: 2)."""
        return part_counts(self.label, self.num_classes)


class EmbeddingStore:
    """SAM embeddings and matching features per image key, each computed once.

    Args:
        sam: the SAM backend.
        features: matching features (None: the SAM encoder's; else e.g. ``Dinov2Features``).
        directory: keep target embeddings (and matching features of a ``features`` encoder) on disk here too (None:
            in memory only).
        max_in_memory: at most this many target embeddings (and as many matching features) stay in memory (None:
            all); others are read back from ``directory`` or, without one, encoded again.
    """

    def __init__(
        self,
        sam: SamBackend,
        features: Callable | None = None,
        directory: str | None = None,
        max_in_memory: int | None = None,
    ):
        self.sam, self.feature_encoder = sam, features
        self.directory, self.max_in_memory = directory, max_in_memory
        self.clock = Clock()
        self._embeddings: OrderedDict[str, Embedding] = OrderedDict()
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()

    def bind(self, job: str) -> None:
        """Tie the embeddings on disk to one job (``bundle.job.fingerprint``): those of another job (another backend,
        other inputs or settings) are removed, never reused."""
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "job.json")
        if os.path.isfile(path):
            with open(path) as f:
                if json.load(f).get("job") == job:
                    return
        for name in os.listdir(self.directory):
            if re.fullmatch(r"[0-9a-f]{40}\.pt", name):
                os.remove(os.path.join(self.directory, name))
        with open(path, "w") as f:
            json.dump({"job": job}, f)

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha1(key.encode()).hexdigest() + ".pt")

    def _save(self, value: Any, path: str) -> None:
        os.makedirs(self.directory, exist_ok=True)
        part = f"{path}.{os.getpid()}.part"  # processes of one run may write the same key
        torch.save(value, part)
        os.replace(part, path)

    def _bounded(self, cache: OrderedDict) -> None:
        if self.max_in_memory is not None and len(cache) > self.max_in_memory:
            cache.popitem(last=False)

    def _encode(self, image: np.ndarray, levels: bool = False) -> Embedding:
        start = time.time()
        embedding = self.sam.encode(image, levels=True) if levels else self.sam.encode(image)
        self.clock.add("sam_encoding_s", start)
        return embedding

    def embedding(self, key: str, image: np.ndarray, levels: bool = False) -> Embedding:
        """The SAM embedding of target ``key`` ((H, W[, 3]) ``image``), computed on first use; with ``levels``, one
        that holds the encoder's stage outputs too (encoded again if the cached one lacks them)."""
        if key in self._embeddings and (self._embeddings[key].levels is not None or not levels):
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        path = self._path(key) if self.directory else None
        e = torch.load(path, weights_only=True) if path and os.path.isfile(path) else None
        if e is not None and (e.get("levels") is not None or not levels):
            size, input_size = tuple(e["original_size"]), tuple(e["input_size"])
            levels_on_disk = None if e.get("levels") is None else e["levels"].to(self.sam.device)
            embedding = Embedding(e["features"].to(self.sam.device), size, input_size, levels=levels_on_disk)
        else:
            embedding = self._encode(image, levels)
            if self.directory:
                self._save(vars(embedding), self._path(key))
        self._embeddings[key] = embedding
        self._bounded(self._embeddings)
        return embedding

    def features(self, key: str, image: np.ndarray) -> torch.Tensor:
        """(D, h, w) L2-normalised matching features of target ``key``."""
        if self.feature_encoder is None:
            return sam_patch_features(self.embedding(key, image), self.sam.img_size)
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        path = self._path(f"{key}#features") if self.directory else None
        if path and os.path.isfile(path):
            features = torch.load(path, weights_only=True)
        else:
            features = self.feature_encoder(image)
            if path:
                self._save(features, path)
        self._features[key] = features
        self._bounded(self._features)
        return features

    def reference_embedding(
        self, reference: Reference, view: int = 0, image: np.ndarray | None = None, levels: bool = False
    ) -> Embedding:
        """The embedding of the reference (``view`` 0) or of one of its augmented views (``image``), in its slot;
        ``levels`` as for ``embedding``."""
        key = ("embedding", view)
        if key not in reference.cache or (levels and reference.cache[key].levels is None):
            reference.cache[key] = self._encode(reference.image if image is None else image, levels)
        return reference.cache[key]

    def reference_features(self, reference: Reference, view: int = 0, image: np.ndarray | None = None) -> torch.Tensor:
        """(D, h, w) matching features of the reference or of one of its views, in its slot."""
        if self.feature_encoder is None:
            return sam_patch_features(self.reference_embedding(reference, view, image), self.sam.img_size)
        key = ("features", view)
        if key not in reference.cache:
            reference.cache[key] = self.feature_encoder(reference.image if image is None else image)
        return reference.cache[key]
