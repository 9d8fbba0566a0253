"""The typed events a TrainingRun emits: the only seam between the engine and any UI or log.

Every event is a frozen dataclass; `to_dict()` gives the JSON written to metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Union


@dataclass(frozen=True)
class MemoryStats:
    rss_bytes: int  # this process
    system_used_bytes: int
    system_total_bytes: int
    mlx_active_bytes: int
    mlx_peak_bytes: int


@dataclass(frozen=True)
class _Event:
    time: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        return {"event": self.kind} | dataclasses.asdict(self)


@dataclass(frozen=True)
class Phase(_Event):
    """Preparation before the first step: importing the model, tokenizing, ..."""
    name: str
    fraction: float


@dataclass(frozen=True)
class Started(_Event):
    run_dir: str
    total_steps: int
    start_step: int
    epochs: float
    train_examples: int
    valid_examples: int
    trainable_params: int
    total_params: int
    effective_batch: int
    device: str
    blas: str
    dtype: str


@dataclass(frozen=True)
class Step(_Event):
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_sec: float
    steps_per_sec: float
    eta_seconds: float
    tokens_seen: int
    memory: MemoryStats


@dataclass(frozen=True)
class Eval(_Event):
    step: int
    val_loss: float
    perplexity: float
    is_best: bool
    seconds: float


@dataclass(frozen=True)
class CheckpointSaved(_Event):
    step: int
    path: str
    reason: str  # "interval", "stop", "final", "manual"
    is_best: bool
    kept: tuple[str, ...]  # every checkpoint on disk after pruning


@dataclass(frozen=True)
class Sample(_Event):
    step: int
    prompt: str
    base: str
    adapter: str


@dataclass(frozen=True)
class Warning(_Event):  # noqa: A001 - the event's natural name
    message: str


@dataclass(frozen=True)
class Paused(_Event):
    step: int


@dataclass(frozen=True)
class Resumed(_Event):
    step: int


@dataclass(frozen=True)
class Finished(_Event):
    step: int
    stopped_early: bool
    final_loss: float | None
    best_val_loss: float | None
    adapter_path: str
    report_path: str


@dataclass(frozen=True)
class Failed(_Event):
    step: int
    message: str
    last_checkpoint: str | None


Event = Union[Phase, Started, Step, Eval, CheckpointSaved, Sample, Warning, Paused, Resumed, Finished, Failed]
Listener = Callable[[Event], None]

EVENT_TYPES = {cls.__name__: cls for cls in (Phase, Started, Step, Eval, CheckpointSaved, Sample, Warning, Paused,
                                             Resumed, Finished, Failed)}


def from_dict(data: dict) -> Event | None:
    """The event a metrics.jsonl line describes (None for a line of an unknown kind, e.g. a newer version's)."""
    cls = EVENT_TYPES.get(data.get("event"))
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k in names}
    for key, value in values.items():
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):  # written readable, see monitor._jsonable
            values[key] = float(value)
    if cls is Step:
        values["memory"] = MemoryStats(**values["memory"])
    if cls is CheckpointSaved:
        values["kept"] = tuple(values["kept"])
    try:
        return cls(**values)
    except TypeError:  # a field missing: a line from another version
        return None
