"""Thread-safe controls for a training run in progress: the UI thread asks (stop, pause, resume, save now),
the training loop answers between steps."""

from __future__ import annotations

import threading


class RunControl:
    """Thread-safe controls for a run in progress (the UI thread calls these; the loop reads them)."""

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
        """Ask for a checkpoint: at the end of the step in progress, or at once while paused."""
        self._save.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def pending(self) -> bool:
        """Whether the UI has asked for something (a stop, a pause, a save) the loop has not answered yet."""
        return self.stop_requested or self.paused or self._save.is_set()

    def wait_until_resumed(self) -> bool:
        """Block the loop while paused, until a resume or a stop (False) or a save_now() (True: the loop saves
        and waits again)."""
        while self.paused and not self.stop_requested:
            if self.take_save_request():
                return True
            self._running.wait(0.2)
        return False

    def take_save_request(self) -> bool:
        """Whether a save was asked for since the last call: True once for each save_now()."""
        if not self._save.is_set():
            return False
        self._save.clear()
        return True
