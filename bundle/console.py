"""What a run shows on the console: progress bars only where someone watches, and third-party notices silenced
where they arise (the messages named, around the call that raises them; nothing filtered globally)."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

__all__ = ["show_progress", "quiet"]


def show_progress(value: bool | str | None) -> bool:
    """``True`` / ``False`` (or their strings, as a command line gives them); ``"auto"``: only when stderr is a
    terminal, so that log files get no progress frames."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return sys.stderr.isatty()
        return text in ("1", "true", "yes", "on")
    return bool(value)


@contextlib.contextmanager
def quiet(*messages: str, loggers: tuple[str, ...] = ()) -> Iterator[None]:
    """Within the block, drop warnings whose text starts with one of ``messages`` and log records below ERROR from
    ``loggers``."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    try:
        for logger, _ in saved:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            for message in messages:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
