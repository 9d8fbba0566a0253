"""The run's log on screen: one timestamped line per event worth a line (as train.log words it)."""

from __future__ import annotations

import time

from textual.widgets import RichLog

from engine.protocol import Event
from engine.train.run_log import describe


class EventLog(RichLog):
    def __init__(self, **kwargs) -> None:
        super().__init__(max_lines=2000, wrap=True, markup=False, **kwargs)

    def add(self, event: Event) -> None:
        line = describe(event)
        if line:
            self.write(time.strftime("%H:%M:%S ") + line)
