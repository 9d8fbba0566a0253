"""Textual messages carrying the engine's typed results from its thread to the UI (post_message is
thread-safe). One wrapper per kind of traffic; frequent progress replaces a queued one."""

from __future__ import annotations

from textual.message import Message


class EngineMessage(Message):
    """Any engine event or result (engine.protocol.*, engine.worker.*)."""

    def __init__(self, payload) -> None:
        super().__init__()
        self.payload = payload

    def can_replace(self, message: Message) -> bool:
        # Progress-like payloads: only the newest matters, so a burst never floods the UI queue.
        kind = type(self.payload).__name__
        return kind in ("Phase", "ProgressUpdate") and isinstance(message, EngineMessage) and \
            type(message.payload).__name__ == kind
