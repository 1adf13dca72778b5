"""Per image and class, one source's mask or the search's best, whichever looks more like the reference's structure.

The cohort-wide choice of a fusing source cannot rescue single images: a lesion much larger or smaller than the
reference's, or elsewhere, is lost in that image only. Here both masks of a class are scored alike by the search's
scorer (``SearchSource.rate``: appearance inside versus around the mask in the frozen features, SAM's IoU, a weak size
prior). The search's mask replaces the primary's only where it scores clearly higher (``margin``): on images whose
frozen features tell the structure poorly from its surroundings (fetal heads in ultrasound) the scorer can prefer the
wrong tissue by a little (at most 0.13 on HC18's tuning split; a locator's backing did not tell those cases apart).
A class the primary serves with the warped label because SAM was unsure of it over the cohort (echocardiography)
keeps it: the search's candidates are SAM's masks too. The scorer does not know where a class lies, so a search mask
that lands mostly on another class's mask (the left lung for the right one: they look alike) does not replace it.

With a ``gate``, the choice is made only for the classes whose primary is clearly beaten often enough: on a sample of
the cohort's images, the share where the search's mask scores more than ``gate_margin`` higher than the primary's is at
least the gate (and two images at least). Where the structure stays put the primary is right on most images and the
scorer's errors in the search's favour stay small (fetal heads: at most 0.13); where it moves or changes size wins
beyond that are common (polyps: 3 images in 10 by more than 0.15). The median Dice between the two masks could not
tell the two apart (polyps' agreement is bimodal). Where a class's count of wins is within one of the bar, one sample
cannot call it, and as many images again, halfway between the first, are measured before deciding. A class the
primary serves with the warp (which the classifier backed) is not measured. Where the gate stays closed the primary
serves every image and the search does not run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from bundle.prediction import Prediction, combine, own_places
from bundle.sources.base import Cohort, Source, load_source, register, save_source
from bundle.sources.search import SearchSource, SearchState
from bundle.store import EmbeddingStore, Reference

__all__ = ["ChoiceSource", "ChoiceState", "sample_positions"]


def sample_positions(n: int, size: int) -> tuple[list[int], list[int]]:
    """Positions of ``size`` images evenly spread over a cohort of ``n``, and of up to ``size`` more halfway between
    them (empty where the first already holds every image)."""
    if n <= size:
        return list(range(n)), []
    first = [int(i * n / size) for i in range(size)]
    second = sorted({int((i + 0.5) * n / size) for i in range(size)} - set(first))
    return first, second


@dataclass
class ChoiceState:
    primary: Any
    search: SearchState
    open: torch.Tensor  # (C,) bool: the classes chosen per image
    wins: list[float | None]  # per class, the share of the gate's sample the search clearly won (None: unmeasured)
    sampled: int = 0  # the images the gate measured
    # the sample's predictions by image key, so the cohort run does not redo them: the primary's, and where the gate
    # opened the search's and the gain too (None where it stayed closed)
    compared: dict[str, tuple[Prediction, Prediction | None, torch.Tensor | None]] = field(default_factory=dict)


@register("choice")
class ChoiceSource(Source):
    """Per image and class, ``primary``'s mask, or ``search``'s where that one scores clearly higher.

    Args:
        primary: the source that serves every class unless the search's mask is better (e.g. ``fused``).
        search: the candidate search whose scorer (``SearchSource.rate``) rates both masks.
        margin: the search's mask must score this much higher than the primary's.
        gate: only classes where the search's mask scores more than ``gate_margin`` higher than the primary's on at
            least this share of ``sample`` images (and on two at least) are chosen per image, and not those the primary
            serves with the warp (None: every class the search may take).
        gate_margin: what a clear win of the search is, for the gate.
        sample: images (evenly spaced over the cohort) the gate is measured on; as many again where a class's count of
            clear wins is within one of the bar.
    """

    kind = "choice"

    def __init__(
        self,
        primary: Source,
        search: SearchSource,
        margin: float = 0.15,
        gate: float | None = None,
        gate_margin: float = 0.1,
        sample: int = 16,
    ):
        self.primary, self.search, self.margin = primary, search, float(margin)
        self.gate, self.gate_margin = (None if gate is None else float(gate)), float(gate_margin)
        self.sample = int(sample)

    def fit(self, reference: Reference, cohort: Cohort, classes: torch.Tensor | None = None) -> ChoiceState:
        primary, search = self.primary.fit(reference, cohort, classes), self.search.fit(reference, cohort, classes)
        state = ChoiceState(primary, search, self._open(primary, len(search.parts)), [None] * len(search.parts))
        if self.gate is None:
            return state
        decisions = self.primary.decisions(primary) or [None] * len(search.parts)
        warped = torch.tensor([bool(getattr(d, "primary", False)) for d in decisions])
        measured = state.open & ~warped
        if not measured.any():
            state.open = measured
            return state

        def measure(indices: list[int]) -> dict[str, tuple[Prediction, Prediction, torch.Tensor]]:
            start = time.time()
            pairs = cohort.map(lambda k, i: (k, self.compare(state, k, i, cohort.store)), "primary and search", indices)
            cohort.store.clock.add("choice_gate_s", start)
            return dict(pairs)

        def clear_wins() -> torch.Tensor:
            """(n, C) whether the search won each compared image's class by more than ``gate_margin``."""
            return torch.stack([gain > self.gate_margin for _, _, gain in compared.values()])

        first, second = sample_positions(len(cohort.items), self.sample)
        compared = measure(first)
        won = clear_wins()
        bar = max(math.ceil(self.gate * len(won) - 1e-9), 2)  # one scorer error never opens a small cohort
        if second and (measured & ((won.sum(0) - bar).abs() <= 1)).any():  # too close to call on one sample
            compared.update(measure(second))
            won = clear_wins()
        share = won.float().mean(0)
        state.wins = [round(float(w), 3) if measured[c] else None for c, w in enumerate(share)]
        state.sampled = len(compared)
        state.open = measured & (share >= self.gate) & (won.sum(0) >= 2)
        state.compared = (
            compared if state.open.any() else {k: (pred, None, None) for k, (pred, _, _) in compared.items()}
        )
        return state

    def decisions(self, state: ChoiceState) -> list[Any]:
        """The primary's decisions, each with the gate's ``search_wins`` and whether it is chosen ``per_image``."""
        decisions = self.primary.decisions(state.primary)
        return [
            SimpleNamespace(
                **vars(d), search_wins=w, gate_images=state.sampled if w is not None else None, per_image=bool(o)
            )
            for d, w, o in zip(decisions, state.wins, state.open)
        ]

    def scores(
        self, state: ChoiceState, first: Prediction, second: Prediction, key: str, image: np.ndarray, store: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """(C,) search scores of the two predictions' masks; -inf where a class was not found."""
        feats = store.features(key, image).float().cpu()
        rated = []
        for pred in (first, second):
            score = self.search.rate(state.search, pred.masks(), pred.iou, feats)
            rated.append(np.where(pred.found.numpy(), score, -np.inf))
        return rated[0], rated[1]

    def compare(
        self, state: ChoiceState, key: str, image: np.ndarray, store: Any
    ) -> tuple[Prediction, Prediction, torch.Tensor]:
        """The primary's and the search's predictions of one image and (C,) how much higher the search's mask scores
        (-inf where the search found nothing, inf where only it found the class)."""
        pred = self.primary.predict(state.primary, key, image, store)
        other = self.search.predict(state.search, key, image, store)
        mine, theirs = self.scores(state, pred, other, key, image, store)
        with np.errstate(invalid="ignore"):
            return pred, other, torch.from_numpy(np.where(np.isfinite(theirs), theirs - mine, -np.inf))

    def _open(self, primary: Any, num_classes: int) -> torch.Tensor:
        """(C,) the classes the search may take: not those the primary serves with the warped label itself because SAM
        was unsure of them over the cohort (the search's candidates are SAM's masks too)."""
        decisions = self.primary.decisions(primary)
        if not decisions:
            return torch.ones(num_classes, dtype=torch.bool)
        return torch.tensor([not getattr(d, "registration", False) for d in decisions])

    def predict(self, state: ChoiceState, key: str, image: np.ndarray, store: EmbeddingStore) -> Prediction:
        open_, kept = state.open, state.compared.get(key)
        if not open_.any():
            return kept[0] if kept else self.primary.predict(state.primary, key, image, store)
        pred, other, gain = kept or self.compare(state, key, image, store)
        switch = own_places((gain > self.margin) & open_, other, pred)
        if not switch.any():
            return pred
        out = combine(~switch, pred, other)
        sources = pred.sources or [self.primary.kind] * len(switch)
        out.sources = [self.search.kind if switch[c] else s for c, s in enumerate(sources)]
        backed = self.primary.supports(state.primary, key, image, store, other)  # for the review's signals
        if pred.support is not None and backed is not None:
            out.support = torch.where(switch, backed.float(), pred.support.float())
        return out

    def state_dict(self, state: ChoiceState) -> dict[str, Any]:
        return {
            "primary": save_source(self.primary, state.primary),
            "search": save_source(self.search, state.search),
            "settings": {
                "margin": self.margin,
                "gate": self.gate,
                "gate_margin": self.gate_margin,
                "sample": self.sample,
            },
            "open": state.open.clone(),
            "wins": list(state.wins),
            "sampled": state.sampled,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], reference: Reference, store: EmbeddingStore, device: torch.device
    ) -> tuple["ChoiceSource", ChoiceState]:
        primary, primary_state = load_source(state["primary"], reference, store, device)
        search, search_state = load_source(state["search"], reference, store, device)
        settings = dict(state["settings"])
        if "gate_margin" not in settings:  # saved before 0.23: its gate was a median agreement, not a share of wins
            settings["gate"] = None
        source = cls(primary, search, **settings)
        C = len(search_state.parts)
        open_ = state["open"].bool() if "open" in state else source._open(primary_state, C)  # models saved before 0.22
        wins = list(state.get("wins", [None] * C))
        return source, ChoiceState(primary_state, search_state, open_, wins, int(state.get("sampled", 0)))
