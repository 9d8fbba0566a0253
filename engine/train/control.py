"""Thread-safe controls for a training run in progress (the UI thread calls these)."""

from __future__ import annotations

import threading


class RunControl:
    """Thread-safe controls for a run in progress (the UI thread calls these)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._save = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()  # wake a paused loop so it can save and exit

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def save_now(self) -> None:
        self._save.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()
