"""Chat screen: streaming chat with the base model or a tuned adapter (any checkpoint), sampling
settings, and a side-by-side mode that answers the same prompt with base and adapter."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll

from tui.screens.base import AppScreen
from tui.widgets.footer import KeyFooter
from textual.widgets import Button, Header, Input, Label, Select, Static, Switch

from engine.generate.reply import GenerationSettings
from engine.protocol import CancelGeneration, Generate
from tui import messages as msg
from tui.screens.export_dialog import ExportDialog

BASE = "base"


def find_adapters(output_dir: str) -> list[str]:
    """Adapter folders under the runs folder: each run's final adapter and its checkpoints, newest first."""
    root = Path(output_dir).expanduser()
    if not root.is_dir():
        return []
    found = [p.parent for p in root.glob("*/adapter/adapter_config.json")]
    found += [p.parent for p in root.glob("*/checkpoints/step_*/adapter_config.json")]
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


class Bubble(Static):
    def __init__(self, who: str, text: str = "", target: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.who, self.text = who, text
        self.target = target  # the model an answer bubble is for (BASE or an adapter folder)
        self.border_title = who

    def on_mount(self) -> None:
        self.update(self.text or "…")

    def append(self, text: str) -> None:
        self.text += text
        self.update(self.text)


class ChatScreen(AppScreen):
    AUTO_FOCUS = "#chat-input"
    BINDINGS = [
        Binding("ctrl+l", "clear", "Clear"),
        Binding("ctrl+y", "copy", "Copy answer"),
        Binding("escape", "cancel", "Stop answer", show=False),
        Binding("ctrl+r", "refresh_models", "Rescan adapters"),
        Binding("ctrl+g", "export", "Export"),  # (ctrl+e is the input's end of line)
    ]

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[dict]] = {}  # the conversation so far, per model
        self.bubbles: dict[int, Bubble] = {}  # answer bubbles by request id, while they are answered
        self.pending: list[Generate] = []  # requests not yet submitted (side by side)
        self.next_id = 1
        self.answering = False
        self.last_answer = ""
        self.seen_run: str | None = None  # the last run whose adapter was offered first
        self.export_dialog: ExportDialog | None = None  # open, or its export still running
        self.wanted_adapter: str | None = None  # to be chosen at the next listing (select_adapter)

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-settings"):
            yield Select([(BASE, BASE)], value=BASE, allow_blank=False, id="chat-model")
            yield Label("temp", classes="setting-label")
            yield Input("0.7", id="chat-temp", classes="setting")
            yield Label("top-p", classes="setting-label")
            yield Input("0.9", id="chat-top-p", classes="setting")
            yield Label("max", classes="setting-label")
            yield Input("256", id="chat-max", classes="setting")
            yield Label("side by side", classes="setting-label")
            yield Switch(False, id="chat-sbs")
        yield VerticalScroll(id="chat-log")
        with Horizontal(id="chat-input-row"):
            yield Input(placeholder="Ask something (Enter sends, Esc stops the answer)", id="chat-input")
            yield Button("Send", id="chat-send", variant="primary")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.action_refresh_models()

    def on_screen_resume(self) -> None:
        if not self.is_current:  # a pre-build's round trip (tui/app.py), not a visit
            return
        self.action_refresh_models()

    def action_refresh_models(self) -> None:
        select = self.query_one("#chat-model", Select)
        current = select.value
        options = [BASE] + find_adapters(self.app.cfg.output.dir)
        if self.app.last_run_dir and str(Path(self.app.last_run_dir) / "adapter") not in options:
            candidate = Path(self.app.last_run_dir) / "adapter"
            if candidate.is_dir():
                options.insert(1, str(candidate))
        select.set_options([(o if o == BASE else self._short(o), o) for o in options])
        newest_run = self.app.last_run_dir
        if newest_run and newest_run != self.seen_run and len(options) > 1:
            self.seen_run = newest_run  # a run just finished: offer its adapter first
            current = str(Path(newest_run) / "adapter")
        if self.wanted_adapter is not None:  # asked for by another screen (Runs' c): it wins
            wanted = Path(self.wanted_adapter).resolve()
            current = next((o for o in options[1:] if Path(o).resolve() == wanted), current)
            self.wanted_adapter = None
        select.value = current if current in options else BASE

    def select_adapter(self, adapter: str) -> None:
        """Choose `adapter` (a folder: a run's adapter or checkpoint) in the model list, now or, before this
        screen is built, when it first lists the models."""
        self.wanted_adapter = adapter
        if self.is_mounted:
            self.action_refresh_models()

    @staticmethod
    def _short(path: str) -> str:
        parts = Path(path).parts
        return "/".join(parts[-3:]) if len(parts) > 3 else path

    def settings(self) -> GenerationSettings | None:
        try:
            temp = float(self.query_one("#chat-temp", Input).value)
            top_p = float(self.query_one("#chat-top-p", Input).value)
            max_tokens = int(self.query_one("#chat-max", Input).value)
        except ValueError:
            self.notify("temperature, top-p and max tokens must be numbers", severity="error")
            return None
        if not (0 <= temp <= 5 and 0 < top_p <= 1 and 1 <= max_tokens <= 32768):
            self.notify("temperature 0–5, top-p in (0, 1], max tokens 1–32768", severity="error")
            return None
        return GenerationSettings(max_tokens, temp, top_p)

    @on(Input.Submitted, "#chat-input")
    @on(Button.Pressed, "#chat-send")
    def send(self) -> None:
        box = self.query_one("#chat-input", Input)
        text = box.value.strip()
        if not text:
            return
        if self.app.training:
            self.notify("The engine is training: chat after the run, or stop it", severity="warning")
            return
        if self.answering:
            self.notify("Still answering (Esc stops it)", severity="warning")
            return
        settings = self.settings()
        if settings is None:
            return
        box.value = ""
        chosen = self.query_one("#chat-model", Select).value
        targets = [BASE, chosen] if self.query_one("#chat-sbs", Switch).value and chosen != BASE else [chosen]
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(Bubble("you", text, classes="user"))
        row = Horizontal(classes="answers")
        log.mount(row)
        for target in targets:
            history = self.history.setdefault(target, [])
            history.append({"role": "user", "content": text})
            request = Generate(self.app.cfg, tuple(history), settings, None if target == BASE else target, self.next_id)
            bubble = Bubble("base model" if target == BASE else f"adapter {self._short(target)}",
                            target=target, classes="assistant")
            self.bubbles[self.next_id] = bubble
            self.next_id += 1
            row.mount(bubble)
            self.pending.append(request)
        # The adapter answers first: its model then answers as the base too, with no second load.
        self.pending.sort(key=lambda r: r.adapter is None)
        log.scroll_end(animate=False)
        self._set_answering(True)
        self._next()

    def _set_answering(self, answering: bool) -> None:
        """While an answer is on its way, Send is off (Enter says so) and Esc stops it."""
        self.answering = answering
        send = self.query_one("#chat-send", Button)
        if answering and send.has_focus:  # a disabled Send loses focus: keep it where typing goes on
            self.query_one("#chat-input", Input).focus()
        send.disabled = answering

    def _next(self) -> None:
        if self.pending:
            self.app.submit(self.pending.pop(0))
        else:
            self._set_answering(False)

    @on(msg.AnswerChunk)
    def show_chunk(self, message: msg.AnswerChunk) -> None:
        chunk = message.result
        if chunk.request_id in self.bubbles:
            self.bubbles[chunk.request_id].append(chunk.text)
            self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    @on(msg.AnswerDone)
    def end_answer(self, message: msg.AnswerDone) -> None:
        done = message.result
        if done.request_id not in self.bubbles:
            return
        bubble = self.bubbles.pop(done.request_id)
        answer = done.text.strip()
        if done.cancelled and not answer:  # stopped while reading the prompt: never answered
            self._unanswered(bubble, " [stopped]")
        else:
            self.history[bubble.target].append({"role": "assistant", "content": answer})
            self.last_answer = answer
            if done.cancelled:
                bubble.append(" [stopped]")
        self._next()

    @on(msg.EngineFailed)
    def end_all_answers(self, message: msg.EngineFailed) -> None:
        """The answer in progress and those queued after it end here; the error itself is notified by the
        app. The next message starts afresh. A failed export is the Export dialog's to show."""
        if message.result.what == "export":
            if (dialog := self._open_dialog()) is not None:
                dialog.show_error(message.result.message)
            self.export_dialog = dialog
            return
        self.pending.clear()
        for bubble in self.bubbles.values():
            self._unanswered(bubble, "(no answer: see the error)")
        self.bubbles.clear()
        self._set_answering(False)

    def _unanswered(self, bubble: Bubble, note: str) -> None:
        """An answer that never came: say so, and take its question out of that model's history (a
        conversation with two user turns in a row is one that some chat templates refuse)."""
        bubble.append(note)
        history = self.history.get(bubble.target, [])
        if history and history[-1]["role"] == "user":
            history.pop()

    def action_cancel(self) -> None:
        if self.answering:
            for request in self.pending:  # queued answers (side by side) are never asked for
                self._unanswered(self.bubbles.pop(request.request_id), " [stopped]")
            self.pending.clear()
            self.app.submit(CancelGeneration())

    def action_export(self) -> None:
        """The chosen model (an adapter, or the base) out to where people run models."""
        chosen = self.query_one("#chat-model", Select).value
        self.export_dialog = ExportDialog(None if chosen == BASE else str(chosen))

        def closed(_) -> None:
            if self.export_dialog is not None and not self.export_dialog.running:
                self.export_dialog = None
        self.app.push_screen(self.export_dialog, closed)

    def _open_dialog(self) -> ExportDialog | None:
        dialog = self.export_dialog
        return dialog if dialog is not None and dialog in self.app.screen_stack else None

    @on(msg.ExportProgressed)
    def export_progress(self, message: msg.ExportProgressed) -> None:
        if (dialog := self._open_dialog()) is not None:
            dialog.show_progress(message.result.what, message.result.fraction)

    @on(msg.ExportFinished)
    def export_done(self, message: msg.ExportFinished) -> None:
        done = message.result
        if (dialog := self._open_dialog()) is not None:
            dialog.show_done(done)
        else:  # the dialog was closed while it ran
            self.export_dialog = None
            self.notify(f"Exported {done.format} to {done.path}", timeout=10)

    def action_clear(self) -> None:
        self.history.clear()
        self.query_one("#chat-log", VerticalScroll).remove_children()

    def action_copy(self) -> None:
        if self.last_answer:
            self.app.copy_to_clipboard(self.last_answer)
            self.notify("Answer copied to the clipboard")
