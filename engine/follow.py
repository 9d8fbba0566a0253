"""Follow a run another process writes (a headless or distributed `lora-tui train`) through its
metrics.jsonl, as the same typed events a local run emits."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from engine import events as ev


def follow_run(run_dir: str | Path, emit: Callable[[ev.Event], None], stopped: Callable[[], bool],
               poll: float = 0.5, wait_for_file: float = 600.0) -> ev.Event | None:
    """Emit every event of run_dir/metrics.jsonl, old ones first, then new ones as they are written, until
    the file ends on a finish or failure (returned; a resumed run's earlier end is passed over) or
    `stopped()` says so at the end of what is written (None). A half-written last line waits for its end."""
    path = Path(run_dir) / "metrics.jsonl"
    waited = 0.0
    while not path.is_file():
        if stopped() or waited > wait_for_file:
            return None
        time.sleep(poll)
        waited += poll
    with open(path, encoding="utf-8") as fh:
        pending, last = "", None
        while True:
            chunk = fh.readline()
            if not chunk:  # at the end of what is written so far
                if isinstance(last, (ev.Finished, ev.Failed)):  # the end, unless a resume appended more
                    return last
                if stopped():
                    return None
                time.sleep(poll)
                continue
            pending += chunk
            if not pending.endswith("\n"):
                continue
            line, pending = pending, ""
            try:
                event = ev.from_dict(json.loads(line))
            except ValueError:
                continue
            if event is None:
                continue
            emit(event)
            last = event
