"""Prompt sources behind one interface (``Source``): fit on the reference and the cohort, predict one image, save
and load the fitted state. The config composes them; ``load_source`` rebuilds a saved one by its kind."""

from bundle.sources.aligned import AlignedSource
from bundle.sources.base import Cohort, Source, load_source, pick_source, save_source
from bundle.sources.choice import ChoiceSource, ChoiceState
from bundle.sources.classifier import ClassifierSource
from bundle.sources.fused import Decision, FusedSource
from bundle.sources.match import MatchSource
from bundle.sources.persam import PerSamSource
from bundle.sources.promise import PromiseSource, PromiseState
from bundle.sources.search import SearchSource, SearchState
from bundle.sources.shifted import ShiftedSource, ShiftedStore
from bundle.sources.warp import WarpSource

__all__ = [
    "AlignedSource",
    "ChoiceSource",
    "ChoiceState",
    "ClassifierSource",
    "Cohort",
    "Decision",
    "FusedSource",
    "MatchSource",
    "PerSamSource",
    "PromiseSource",
    "PromiseState",
    "SearchSource",
    "SearchState",
    "ShiftedSource",
    "ShiftedStore",
    "Source",
    "WarpSource",
    "load_source",
    "pick_source",
    "save_source",
]
