"""Follow a run another process writes (a headless or distributed `lora-tui train`) through its
metrics.jsonl, as the same typed events a local run emits."""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from pathlib import Path
from typing import Callable

from engine import protocol as ev

REPORTED_BAD_LINES = 3  # bad lines reported one by one; later ones are skipped quietly


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
    with open(path, encoding="utf-8", errors="replace") as fh:
        pending, last = "", None
        number = bad = 0
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
            number += 1
            event, problem = parse_event(line)
            if problem:
                bad += 1
                if bad <= REPORTED_BAD_LINES:
                    more = "; later bad lines are skipped without a word" if bad == REPORTED_BAD_LINES else ""
                    emit(ev.Warning(f"{path}:{number}: skipped, {problem}{more}"))
                continue
            if event is None:
                continue
            emit(event)
            last = event


def parse_event(line: str) -> tuple[ev.Event | None, str | None]:
    """(event, None) for a good metrics.jsonl line, (None, None) for an event of an unknown kind (a newer
    version's), (None, problem) for a line that is no event: junk, or a field of the wrong type (a string
    `loss` once crashed the whole app)."""
    try:
        data = json.loads(line)
    except ValueError:
        return None, "not JSON"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    if data.get("event") not in ev.EVENT_TYPES:
        return None, None
    try:
        event = ev.from_dict(data)
    except (TypeError, KeyError, ValueError, AttributeError):
        event = None
    if event is None:
        return None, f"a {data['event']} event with missing or malformed fields"
    wrong = _wrong_field(event)
    return (None, f"{data['event']}.{wrong}") if wrong else (event, None)


def _wrong_field(obj) -> str | None:
    """The first field of a (nested) event dataclass whose value does not have its declared type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            inner = _wrong_field(value)
            if inner:
                return f"{f.name}.{inner}"
        elif not _has_type(value, hints[f.name]):
            return f"{f.name} is {json.dumps(value)[:40]}, not {_type_name(hints[f.name])}"
    return None


def _has_type(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # JSON writes 2.0 as 2 at times
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("NoneType", "None")
