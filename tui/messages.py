"""Textual messages for the engine's typed results (engine.protocol), one class per kind the UI handles.

The engine thread (and a followed run's reader) posts `engine_message(result)`: post_message is
thread-safe. Screens and widgets handle the kinds they own with `@on(RunStep)` and the like; the app
posts each message to the screen that owns its kind (tui/app.py). Progress-like messages replace a
queued one of their kind, so a burst never floods the UI's queue.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from textual.message import Message

from engine import protocol as p

R = TypeVar("R")


class EngineMessage(Message, Generic[R]):
    """One engine result or event, as the engine sent it (`result`). It goes to the app, which posts it on to
    the screen that owns it; it never bubbles (from that screen back to the app)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(bubble=False, **kwargs)

    def __init__(self, result: R) -> None:
        super().__init__()
        self.result: R = result


class _Coalesced(EngineMessage[R]):
    """Only the newest matters: a newer one replaces one still queued."""

    def can_replace(self, message: Message) -> bool:
        return type(message) is type(self)


# ---------------------------------------------------------------- the Dataset screen's
class ValidationProgress(_Coalesced[p.ProgressUpdate]):
    pass


class DatasetValidated(EngineMessage[p.DatasetChecked]):
    pass


# ---------------------------------------------------------------- the Train screen's: a run's events
class RunPhase(_Coalesced[p.Phase]):
    pass


class RunStarted(EngineMessage[p.Started]):
    pass


class RunStep(EngineMessage[p.Step]):
    pass


class RunEval(EngineMessage[p.Eval]):
    pass


class RunCheckpointSaved(EngineMessage[p.CheckpointSaved]):
    pass


class RunSample(EngineMessage[p.Sample]):
    pass


class RunWarning(EngineMessage[p.Warning]):
    pass


class RunPaused(EngineMessage[p.Paused]):
    pass


class RunResumed(EngineMessage[p.Resumed]):
    pass


class RunFinished(EngineMessage[p.Finished]):
    pass


class RunFailed(EngineMessage[p.Failed]):
    pass


# ---------------------------------------------------------------- the app's and the Train screen's: the engine's run
class TrainingBegan(EngineMessage[p.TrainingStarted]):
    pass


class TrainingOver(EngineMessage[p.TrainingEnded]):
    pass


# ---------------------------------------------------------------- the Chat screen's
class AnswerChunk(EngineMessage[p.GenerationChunk]):
    pass


class AnswerDone(EngineMessage[p.GenerationDone]):
    pass


# ---------------------------------------------------------------- the app's, then the screen it concerns
class EngineFailed(EngineMessage[p.EngineError]):
    pass


MESSAGE_FOR: dict[type, type[EngineMessage]] = {
    p.ProgressUpdate: ValidationProgress, p.DatasetChecked: DatasetValidated,
    p.Phase: RunPhase, p.Started: RunStarted, p.Step: RunStep, p.Eval: RunEval,
    p.CheckpointSaved: RunCheckpointSaved, p.Sample: RunSample, p.Warning: RunWarning, p.Paused: RunPaused,
    p.Resumed: RunResumed, p.Finished: RunFinished, p.Failed: RunFailed,
    p.TrainingStarted: TrainingBegan, p.TrainingEnded: TrainingOver,
    p.GenerationChunk: AnswerChunk, p.GenerationDone: AnswerDone,
    p.EngineError: EngineFailed,
}

RUN_EVENTS = (RunPhase, RunStarted, RunStep, RunEval, RunCheckpointSaved, RunSample, RunWarning, RunPaused,
              RunResumed, RunFinished, RunFailed)


def engine_message(result: p.Result) -> EngineMessage:
    """The message that carries `result` to its owner."""
    return MESSAGE_FOR[type(result)](result)
