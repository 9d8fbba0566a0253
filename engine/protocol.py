"""The protocol between the engine and any UI or log: every command a UI submits to the engine thread,
every result it gets back, and the typed events a TrainingRun emits (also written to metrics.jsonl).

Everything is a frozen dataclass. A command carries its own copy of the config (taken when it is built),
so an edit in the UI never reaches work already submitted. Types named only for annotations are imported
under TYPE_CHECKING: this module sits below every wing and imports none of them at run time.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Union

if TYPE_CHECKING:
    from engine.config.schema import Config
    from engine.data.validate import DatasetReport
    from engine.generate.reply import GenerationSettings
    from engine.train.control import RunControl


@dataclass(frozen=True)
class MemoryStats:
    rss_bytes: int  # this process
    system_used_bytes: int
    system_total_bytes: int
    mlx_active_bytes: int
    mlx_peak_bytes: int


@dataclass(frozen=True)
class PreferenceStats:
    """What a KTO/DPO/ORPO step or validation shows beside its loss (None where the method has no such value):
    mean rewards of desirable/chosen and undesirable/rejected answers, their margin, the share of rows on the
    right side (DPO/ORPO: chosen above rejected; KTO: log ratio above z0 if desirable, below if not), KTO's
    reference point z0 (its KL estimate) and ORPO's NLL term."""
    method: str
    chosen_reward: float | None
    rejected_reward: float | None
    margin: float | None
    accuracy: float
    kl: float | None
    nll: float | None

    def describe(self) -> str:
        show = lambda x: "-" if x is None else f"{x:+.3f}"  # noqa: E731
        names = ("desirable", "undesirable") if self.method == "kto" else ("chosen", "rejected")
        text = (f"rewards {names[0]} {show(self.chosen_reward)} / {names[1]} {show(self.rejected_reward)}, "
                f"margin {show(self.margin)}, accuracy {self.accuracy:.0%}")
        if self.kl is not None:
            text += f", KL {self.kl:.4f}"
        if self.nll is not None:
            text += f", NLL {self.nll:.4f}"
        return text


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
    data: tuple[str, ...] = ()  # what was read: each source's container and row shapes, column map, mix


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
    preference: PreferenceStats | None = None  # kto, dpo and orpo runs


@dataclass(frozen=True)
class Eval(_Event):
    step: int
    val_loss: float
    perplexity: float
    is_best: bool
    seconds: float
    preference: PreferenceStats | None = None  # kto, dpo and orpo runs (perplexity is then NaN)


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


def _numbers(values: dict) -> dict:
    """NaN and infinities back from the words metrics.jsonl writes them as (see run_log._jsonable)."""
    return {k: float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v for k, v in values.items()}


def from_dict(data: dict) -> Event | None:
    """The event a metrics.jsonl line describes (None for a line of an unknown kind, e.g. a newer version's)."""
    cls = EVENT_TYPES.get(data.get("event"))
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    values = _numbers({k: v for k, v in data.items() if k in names})
    if cls is Step:
        values["memory"] = MemoryStats(**values["memory"])
    if cls is CheckpointSaved:
        values["kept"] = tuple(values["kept"])
    if cls is Started and isinstance(values.get("data"), list):
        values["data"] = tuple(values["data"])
    try:
        if isinstance(values.get("preference"), dict):
            values["preference"] = PreferenceStats(**_numbers(values["preference"]))
        return cls(**values)
    except TypeError:  # a field missing: a line from another version
        return None


# ---------------------------------------------------------------- commands (UI -> engine thread)

@dataclass(frozen=True)
class _WithConfig:
    """A command that works from a config: it carries its own copy, never the UI's live config."""
    cfg: Config

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg", copy.deepcopy(self.cfg))


@dataclass(frozen=True)
class ValidateDataset(_WithConfig):
    path: str


@dataclass(frozen=True)
class StartTraining(_WithConfig):
    resume: str | None = None


@dataclass(frozen=True)
class Generate(_WithConfig):
    """Answer `messages` with the base model (adapter=None) or an adapter/checkpoint folder. The answer (and
    a failure) goes to the screen named by `owner`: each screen numbers its own requests."""
    messages: tuple[dict[str, str], ...]  # {"role": ..., "content": ...} each
    settings: GenerationSettings
    adapter: str | None = None
    request_id: int = 0
    owner: Literal["chat", "review"] = "chat"


@dataclass(frozen=True)
class ExportModel(_WithConfig):
    """Write base + adapter (adapter=None: the base) as `to` (gguf, ollama, peft, mlx) at `out`."""
    to: str
    out: str
    adapter: str | None = None
    quant: str | None = None


@dataclass(frozen=True)
class CancelGeneration:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


# ---------------------------------------------------------------- results (engine thread -> UI), besides events

@dataclass(frozen=True)
class ProgressUpdate:
    what: str
    fraction: float


@dataclass(frozen=True)
class ConversationPreview:
    """The first valid conversation of a dataset as the chat template renders it, to show the loss mask."""
    line: int  # its line number in the file (or its row index in a table)
    pieces: tuple[tuple[str, bool], ...]  # (token text, trained) per token
    unit: str = "line"  # "line" or "row"


@dataclass(frozen=True)
class DatasetChecked:
    report: DatasetReport
    preview: ConversationPreview | None


@dataclass(frozen=True)
class TrainingStarted:
    control: RunControl


@dataclass(frozen=True)
class TrainingEnded:
    status: str
    run_dir: str
    step: int
    message: str


@dataclass(frozen=True)
class GenerationChunk:
    request_id: int
    text: str
    tokens: int
    tokens_per_sec: float
    owner: str = "chat"  # the asking Generate's owner


@dataclass(frozen=True)
class GenerationDone:
    request_id: int
    text: str
    cancelled: bool
    owner: str = "chat"  # the asking Generate's owner


@dataclass(frozen=True)
class ExportProgress:
    what: str
    fraction: float


@dataclass(frozen=True)
class ExportDone:
    path: str
    bytes: int
    format: str
    seconds: float


@dataclass(frozen=True)
class EngineError:
    """An expected failure, with a message a user can act on."""
    # what failed; the UI shows it where that is ("chat"/"review": a Generate, named by its owner)
    what: Literal["dataset", "training", "chat", "review", "export", "engine"]
    message: str


Command = Union[ValidateDataset, StartTraining, Generate, ExportModel, CancelGeneration, Shutdown]
Result = Union[Event, ProgressUpdate, DatasetChecked, TrainingStarted, TrainingEnded, GenerationChunk,
               GenerationDone, ExportProgress, ExportDone, EngineError]
