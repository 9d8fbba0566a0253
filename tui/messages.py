"""Textual messages for the engine's typed results (engine.protocol), one class per kind of result.

Each class names the result type it carries (`carries=`) and, through its base, the screen that shows it:
DatasetMessage, TrainMessage (RunLogged for the run events the Train screen's log lists) and ChatMessage;
an answer (AnswerChunk, AnswerDone) goes to the screen that asked for it (Generate.owner: the Chat or the
Review screen); EngineFailed goes where its error's `what` says. The engine thread (and a followed run's
reader) posts `engine_message(result)`: post_message is thread-safe. The app posts each message on to its
owner's screen, where it is handled with `@on(RunStep)` and the like. Progress-like messages replace a queued one
of their kind, so a burst never floods the UI's queue.
"""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

from textual.message import Message

from engine import protocol as p

R = TypeVar("R")

MESSAGE_FOR: dict[type, type[EngineMessage]] = {}  # result type -> the message class that carries it


class EngineMessage(Message, Generic[R]):
    """One engine result or event, as the engine sent it (`result`). It goes to the app, which posts it on to
    the screen that owns it (`owner`: a mode's name, None where only the app cares); it never bubbles (from
    that screen back to the app)."""

    OWNER: ClassVar[str | None] = None

    def __init_subclass__(cls, carries: type | None = None, **kwargs) -> None:
        super().__init_subclass__(bubble=False, **kwargs)
        if carries is not None:
            MESSAGE_FOR[carries] = cls

    def __init__(self, result: R) -> None:
        super().__init__()
        self.result: R = result

    @property
    def owner(self) -> str | None:
        return self.OWNER


class Coalesced(Message):
    """Only the newest matters: a newer one replaces one still queued."""

    def can_replace(self, message: Message) -> bool:
        return type(message) is type(self)


class DatasetMessage(EngineMessage[R]):
    OWNER = "dataset"


class TrainMessage(EngineMessage[R]):
    OWNER = "train"


class RunLogged(TrainMessage[R]):
    """A run event that the Train screen's log lists."""


class ChatMessage(EngineMessage[R]):
    OWNER = "chat"


# ---------------------------------------------------------------- the Dataset screen's
class ValidationProgress(Coalesced, DatasetMessage[p.ProgressUpdate], carries=p.ProgressUpdate):
    pass


class DatasetValidated(DatasetMessage[p.DatasetChecked], carries=p.DatasetChecked):
    pass


# ---------------------------------------------------------------- the Train screen's: a run's events
class RunPhase(Coalesced, TrainMessage[p.Phase], carries=p.Phase):
    pass


class RunStep(TrainMessage[p.Step], carries=p.Step):
    pass


class RunStarted(RunLogged[p.Started], carries=p.Started):
    pass


class RunEval(RunLogged[p.Eval], carries=p.Eval):
    pass


class RunCheckpointSaved(RunLogged[p.CheckpointSaved], carries=p.CheckpointSaved):
    pass


class RunSample(RunLogged[p.Sample], carries=p.Sample):
    pass


class RunWarning(RunLogged[p.Warning], carries=p.Warning):
    pass


class RunPaused(RunLogged[p.Paused], carries=p.Paused):
    pass


class RunResumed(RunLogged[p.Resumed], carries=p.Resumed):
    pass


class RunFinished(RunLogged[p.Finished], carries=p.Finished):
    pass


class RunFailed(RunLogged[p.Failed], carries=p.Failed):
    pass


# ---------------------------------------------------------------- the app's and the Train screen's: the engine's run
class TrainingBegan(TrainMessage[p.TrainingStarted], carries=p.TrainingStarted):
    pass


class TrainingOver(TrainMessage[p.TrainingEnded], carries=p.TrainingEnded):
    pass


# ---------------------------------------------------------------- the Chat screen's, or the Review screen's
class ToAsker:
    """An answer goes to the screen that asked for it: its Generate's owner, copied onto each result (the
    Chat screen's by default)."""

    @property
    def owner(self) -> str | None:
        return getattr(self.result, "owner", None) or ChatMessage.OWNER


class AnswerChunk(ToAsker, ChatMessage[p.GenerationChunk], carries=p.GenerationChunk):
    pass


class AnswerDone(ToAsker, ChatMessage[p.GenerationDone], carries=p.GenerationDone):
    pass


# ---------------------------------------------------------------- the Chat screen's Export dialog
class ExportProgressed(Coalesced, ChatMessage[p.ExportProgress], carries=p.ExportProgress):
    pass


class ExportFinished(ChatMessage[p.ExportDone], carries=p.ExportDone):
    pass


# ---------------------------------------------------------------- the app's, then the screen it concerns
class EngineFailed(EngineMessage[p.EngineError], carries=p.EngineError):
    SCREEN_FOR: ClassVar[dict[str, str]] = {"dataset": "dataset", "chat": "chat", "review": "review",
                                            "export": "chat"}  # -> its screen

    @property
    def owner(self) -> str | None:
        return self.SCREEN_FOR.get(self.result.what)


def engine_message(result: p.Result) -> EngineMessage | None:
    """The message that carries `result` to its owner; None for a result no message carries."""
    cls = MESSAGE_FOR.get(type(result))
    return None if cls is None else cls(result)
