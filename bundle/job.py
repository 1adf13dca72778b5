"""What identifies a job, for resuming: the whole parsed config (every id and override) and the input files."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from typing import Any

from monai.bundle import ConfigParser

from bundle.io import Case

__all__ = ["PRESENTATION_IDS", "parsed_config", "fingerprint"]

# ids that change how a run is shown or where it goes, not what it computes
PRESENTATION_IDS = (
    "output_dir",
    "progress",
    "show_progress",
    "resume",
    "num_overlays",
    "adapted_model",
    "overwrite_model",
    "_meta_",
)


def parsed_config() -> dict[str, Any] | None:
    """The config (files merged, overrides applied, before any reference is resolved) of the ``monai.bundle``
    ``ConfigParser`` that is building the caller; None when not called while a parser builds a component.

    Used in a config as ``job: "$bundle.job.parsed_config()"``.
    """
    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_locals.get("self")
        if isinstance(parser, ConfigParser):
            return copy.deepcopy(parser.get())
        frame = frame.f_back
    return None


def _stat(path: str | None) -> list:
    if not path or not os.path.exists(path):
        return [path]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def fingerprint(config: dict[str, Any] | None, reference: Case, targets: list[Case]) -> str:
    """SHA-256 of the config (less ``PRESENTATION_IDS``), the reference's files and the targets' files."""
    job = {
        "config": {k: v for k, v in (config or {}).items() if k not in PRESENTATION_IDS},
        "reference": _stat(reference.image_path) + _stat(reference.label_path),
        "targets": [[c.id, *_stat(c.image_path)] for c in targets],
    }
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()
