"""How a run ends early: a failure it reports (TrainingError) or a stop before its first step."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run cannot go on; the message says why and what to do. `kind` sorts it for exit codes."""

    def __init__(self, message: str, kind: str = "training"):
        super().__init__(message)
        self.kind = kind  # "config", "data", "model", "checkpoint", "training", "disk"


class StoppedEarly(Exception):
    """A stop asked for before the first step: nothing was trained, so nothing is saved."""
