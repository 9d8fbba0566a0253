"""What a reader shares with its caller while it runs: progress, and why it stopped early."""

from __future__ import annotations

from dataclasses import dataclass

BLANK = object()  # what a reader yields for a blank line (None is JSON's null: a bad record)


@dataclass
class ReadState:
    done: int = 0  # bytes (files) or rows (tables) read so far, for progress
    total: int = 0  # the same unit's total; 0 = unknown
    ended: str | None = None  # the reader could not go on past a broken record: the rest is unread

    def end(self, reason: str) -> tuple[str, str]:
        """Record that the read ends here; the (field, reason) to report for the record."""
        self.ended = reason
        return "", reason


class DatasetError(ValueError):
    """The dataset cannot be used at all (missing file, a format we do not read, over the error threshold)."""
