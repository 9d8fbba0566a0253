"""One long-lived engine thread that owns every MLX call, driven by typed commands.

MLX streams are per thread, so the model, its adapters and every array a run or a chat builds live on
this thread. A UI submits commands (thread-safe) and receives typed results through one `emit`
callback; it never touches the engine's internals. Training control (pause/stop) goes through the
RunControl handed back in TrainingStarted, which is thread-safe by design.
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from engine.config.schema import Config
from engine.protocol import CancelGeneration, Command, ConversationPreview, DatasetChecked, EngineError, \
    ExportDone, ExportModel, ExportProgress, Generate, \
    GenerationChunk, GenerationDone, ProgressUpdate, Result, Shutdown, StartTraining, TrainingEnded, \
    TrainingStarted, ValidateDataset
from engine.train.control import RunControl

if TYPE_CHECKING:  # annotations only: MLX is imported on the engine thread, when first needed
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from engine.generate.decoding import PromptCache


@dataclass
class _ChatModel:
    base: tuple[str, str, str]  # (model.name, model.dtype, model.quantized_base)
    adapter: str | None
    model: nn.Module
    tokenizer: TokenizerWrapper
    # A PromptCache per answering model (adapter path, or None for the base): the next turn of each
    # conversation prefills only what is new
    prompt_caches: dict[str | None, PromptCache] = field(default_factory=dict)


@dataclass
class EngineWorker:
    emit: Callable[[Result], None]
    _queue: "queue.Queue[Command]" = field(default_factory=queue.Queue)
    _cancel_generation: threading.Event = field(default_factory=threading.Event)
    # Set by Shutdown as soon as it is submitted: long work (validation, a chat's prefill) checks it, so
    # quitting never waits for that work to end.
    _shutting_down: threading.Event = field(default_factory=threading.Event)
    _chat: _ChatModel | None = None
    finished: threading.Event = field(default_factory=threading.Event)  # serve() has returned
    _should_exit: Callable[[], bool] = lambda: False  # the host's own stop (the app's worker cancelled)

    def submit(self, command: Command) -> None:
        if isinstance(command, Generate):  # here, not when it starts: a Stop pressed before then still counts
            self._cancel_generation.clear()
        elif isinstance(command, CancelGeneration):
            self._cancel_generation.set()
        elif isinstance(command, Shutdown):
            self._shutting_down.set()
        self._queue.put(command)

    def serve(self, should_exit: Callable[[], bool] = lambda: False) -> None:
        """Process commands until Shutdown (run this on the engine thread)."""
        yield_cpu_to_ui()
        self._should_exit = should_exit
        try:
            self._serve(should_exit)
        finally:
            self._chat = None
            from engine import release_mlx_streams
            release_mlx_streams()
            self.finished.set()

    def _stopping(self) -> bool:
        return self._shutting_down.is_set() or self._should_exit()

    def _serve(self, should_exit: Callable[[], bool]) -> None:
        while not should_exit():
            try:
                command = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(command, Shutdown) or self._shutting_down.is_set():
                break
            try:
                self._handle(command)
            except Exception as exc:  # keep serving: report to the screen that asked, don't die
                what = {ValidateDataset: "dataset", StartTraining: "training",
                        ExportModel: "export"}.get(type(command), "engine")
                self.emit(EngineError(what, f"{type(exc).__name__}: {exc}"))
                traceback.print_exc()

    def _handle(self, command: Command) -> None:
        if isinstance(command, ValidateDataset):
            self._validate(command)
        elif isinstance(command, StartTraining):
            self._chat = None  # free its memory for training
            from engine.train.run import TrainingRun
            control = RunControl()
            self.emit(TrainingStarted(control))
            try:
                result = TrainingRun(command.cfg, [self.emit], control, resume=command.resume).run()
            except Exception as exc:  # the run never started: the UI must not wait for it
                self.emit(TrainingEnded("failed", "", 0, f"{type(exc).__name__}: {exc}"))
                raise
            self.emit(TrainingEnded(result.status, str(result.run_dir), result.step, result.message))
        elif isinstance(command, ExportModel):
            self._chat = None  # free the chat model: the export loads its own copy
            self._export(command)
        elif isinstance(command, Generate):
            from engine.data.template import EncodeError
            try:
                self._generate(command)
            except EncodeError as exc:  # the chat template refused the conversation
                self.emit(EngineError(command.owner, f"no answer: {exc}"))
            except Exception as exc:  # whatever it was, this answer ends here and the chat goes on
                traceback.print_exc()
                self.emit(EngineError(command.owner, f"no answer: {type(exc).__name__}: {exc}"))

    def _validate(self, cmd: ValidateDataset) -> None:
        from engine.data import DatasetError, validate_with_config
        from engine.model.loading import ModelLoadError, load_tokenizer
        cfg = cmd.cfg
        try:
            # A first use of the embedded model may download it (~93 MB): the same bar shows that first.
            tokenizer = load_tokenizer(cfg.model, lambda what, fraction: self.emit(ProgressUpdate(what, fraction)))
            report, _ = validate_with_config(
                cfg, tokenizer, cmd.path, should_stop=self._stopping,
                progress=lambda done, total: self.emit(ProgressUpdate("validating", done / total)))
        except (DatasetError, ModelLoadError) as exc:
            self.emit(EngineError("dataset", str(exc)))
            return
        if self._stopping():  # quitting: the report is partial and no one will read it
            return
        self.emit(DatasetChecked(report, _preview(cmd.path, tokenizer, cfg, self._stopping)))

    def _export(self, cmd: ExportModel) -> None:
        import time

        from engine.export.errors import ExportError
        from engine.export.formats import export
        from engine.export.fuse import FuseError
        from engine.model.adapters import AdapterError
        from engine.model.loading import ModelLoadError
        t0 = time.perf_counter()
        try:
            result = export(cmd.cfg, cmd.adapter, cmd.to, cmd.out, cmd.quant,
                            lambda what, fraction: self.emit(ExportProgress(what, fraction)))
        except (ExportError, AdapterError, FuseError, ModelLoadError) as exc:
            self.emit(EngineError("export", str(exc)))
            return
        self.emit(ExportDone(result["path"], result["bytes"], result["format"], time.perf_counter() - t0))

    def _chat_model(self, cfg: Config, adapter: str | None) -> _ChatModel:
        """The loaded chat model, reloaded only for another base or adapter: a model with an adapter also
        answers as the base (side by side), with its adapter layers swapped out for that answer."""
        base = (cfg.model.name, cfg.model.dtype, cfg.model.quantized_base)
        chat = self._chat
        if chat is None or chat.base != base or adapter not in (None, chat.adapter):
            chat = self._chat = None  # free the old model before loading the new one
            from engine.generate.decoding import load_for_chat
            model, tok, _ = load_for_chat(cfg, adapter)
            self._chat = chat = _ChatModel(base, adapter, model, tok)
        return chat

    def _generate(self, cmd: Generate) -> None:
        from contextlib import nullcontext

        from engine.model.adapters import AdapterError, adapters_disabled
        from engine.generate.decoding import PromptCache
        from engine.generate.reply import stream_reply
        from engine.model.loading import ModelLoadError
        try:
            chat = self._chat_model(cmd.cfg, cmd.adapter)
        except (ModelLoadError, AdapterError) as exc:
            self.emit(EngineError(cmd.owner, str(exc)))
            return
        as_base = cmd.adapter is None and chat.adapter is not None
        cache = chat.prompt_caches.setdefault(cmd.adapter, PromptCache())
        parts: list[str] = []
        stopped = lambda: self._cancel_generation.is_set() or self._stopping()  # noqa: E731
        with adapters_disabled(chat.model) if as_base else nullcontext():
            for chunk in stream_reply(chat.model, chat.tokenizer, list(cmd.messages), cmd.settings,
                                      prompt_cache=cache, should_stop=stopped):
                parts.append(chunk.text)
                self.emit(GenerationChunk(cmd.request_id, chunk.text, chunk.tokens, chunk.generation_tps,
                                          cmd.owner))
                if stopped():
                    break
        self.emit(GenerationDone(cmd.request_id, "".join(parts), stopped(), cmd.owner))


ENGINE_NICE = 10


def yield_cpu_to_ui() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread, and the BLAS and MLX threads it starts
    inherit it). On a 2-core machine the training saturates both cores; at nice 10 the UI thread still
    gets the CPU at once when a key arrives, and training only slows while the UI is actually busy."""
    import os
    import sys
    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENGINE_NICE)
        except OSError:
            pass


def _preview(path: str, tokenizer, cfg: Config,
             stopped: Callable[[], bool] = lambda: False) -> ConversationPreview | None:
    """The first valid conversation (of the first source, for a mix) as (piece, trained) pairs, to show
    masking. Rows are read as validation reads them: a JSONL line over its size limit is skipped, never
    loaded (a 200 MB first line once took this preview past 10 GB)."""
    from engine.data import ChatEncoder
    from engine.data.mixture import source_specs
    from engine.data.validate import first_conversations
    encoder = ChatEncoder(tokenizer, cfg.data.mask_prompt)
    try:
        for number, unit, conv in first_conversations(source_specs(path)[0].path, cfg.data.columns,
                                                      stopped=stopped):
            enc = encoder.encode(conv)
            pieces = [encoder.tok.decode([int(t)]) for t in enc.tokens[:cfg.model.max_seq_length]]
            return ConversationPreview(number, tuple(zip(pieces, enc.trained.tolist())), unit)
    except Exception:
        return None
    return None