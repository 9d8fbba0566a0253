"""Typed messages that engine workers post to the app (post_message is thread-safe)."""

from __future__ import annotations

from textual.message import Message


class EngineProgress(Message):
    def __init__(self, what: str, fraction: float) -> None:
        super().__init__()
        self.what = what
        self.fraction = fraction

    def can_replace(self, message: Message) -> bool:  # only the newest progress matters
        return isinstance(message, EngineProgress)


class DatasetValidated(Message):
    def __init__(self, report) -> None:
        super().__init__()
        self.report = report


class EngineFailed(Message):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
