"""Review screen (F6): blind A/B review of two sources (the base model, any run's adapter or checkpoint) on
held-out or typed prompts, with judgements tallied and answers labelled back into a dataset (issue 20).

Both answers of a prompt are shown side by side in the session's seeded left/right order, named only
"A (left)" and "B (right)" until the pair is judged. Neither answer is shown before both are done: the
engine answers with the loaded adapter first, so the side that filled first would give the source away.
The session (engine.review.session) is saved after every answer, prompt, judgement and label; the next
visit after a quit or a crash resumes the last unfinished one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.markup import escape
from textual.widgets import Button, Header, Input, Select, Static

from engine.data.sources.state import DatasetError
from engine.generate.reply import GenerationSettings
from engine.protocol import Generate
from engine.review.labels import LabelError, append_labelled
from engine.review.prompts import read_prompts
from engine.review.session import BASE, ReviewSession, SessionError, latest_unfinished
from tui import messages as msg
from tui.screens.base import AppScreen
from tui.screens.chat_screen import find_adapters
from tui.widgets.footer import KeyFooter

HELDOUT, TYPED = "heldout", "typed"
GREEDY, CHAT_SAMPLING = "greedy", "chat"
CHAT_DEFAULTS = GenerationSettings(256, 0.7, 0.9)  # the Chat screen's fields as they start
PREFETCH = 2  # prompts after the one shown whose answers are asked for ahead
SIDES = (("left", "A"), ("right", "B"))
VERDICT_TEXT = {"left": "A (left) better", "right": "B (right) better", "tie": "tie", "both-bad": "both bad"}


class AnswerPanel(VerticalScroll, inherit_bindings=False):
    """One side's answer. Focusable (d/u label the focused one); up/down/page keys scroll it, while
    left/right stay the screen's judgements."""

    BINDINGS = [Binding("up", "scroll_up", show=False), Binding("down", "scroll_down", show=False),
                Binding("pageup", "page_up", show=False), Binding("pagedown", "page_down", show=False),
                Binding("home", "scroll_home", show=False), Binding("end", "scroll_end", show=False)]

    def __init__(self, side: str, letter: str) -> None:
        super().__init__(Static(classes="answer-text"), id=f"answer-{side}")
        self.side, self.letter = side, letter
        self.border_title = f"{letter} ({side})"

    def show(self, title: str, text: str) -> None:
        self.border_title = escape(title)  # a folder's name may hold [brackets]
        self.query_one(".answer-text", Static).update(Text(text))  # a model's text, never markup


class ReviewScreen(AppScreen):
    AUTO_FOCUS = "#answer-left"
    BINDINGS = [
        Binding("1,left", "judge('left')", "A better", key_display="1"),
        Binding("2,right", "judge('right')", "B better", key_display="2"),
        Binding("t", "judge('tie')", "Tie"),
        Binding("b", "judge('both-bad')", "Both bad"),
        Binding("n", "move(1)", "Next"),
        Binding("p", "move(-1)", "Prev"),
        Binding("d", "label('desirable')", "Desirable"),
        Binding("u", "label('undesirable')", "Undesirable"),
        Binding("escape", "focus_answers", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.session: ReviewSession | None = None
        self.current = 0  # the item shown
        self.requests: dict[int, tuple[ReviewSession, int, int]] = {}  # request id -> (session, item, source)
        self.in_flight: int | None = None  # the request the engine works on (one at a time)
        self.next_id = 1
        self.tokens = 0  # of the answer in flight, for the status line
        self.halted: str | None = None  # an answer failed: ask for no more until the user moves on
        self.loaded_adapter: str | None = None  # the adapter asked for last: the engine holds it loaded
        self.resumed = False  # the session shown was resumed from its file

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="review-setup"):
            yield Select([("base model", BASE)], value=BASE, allow_blank=False, id="review-first")
            yield Select([("base model", BASE)], value=BASE, allow_blank=False, id="review-second")
            yield Select([("held-out", HELDOUT), ("typed", TYPED)], value=HELDOUT, allow_blank=False,
                         id="review-prompts")
            yield Button("Start", id="review-start", variant="primary")
        with Horizontal(id="review-inputs"):
            yield Input(placeholder="Type a prompt, Enter adds it (Esc: to the answers)", id="review-typed")
            yield Select([("greedy", GREEDY), ("chat's sampling", CHAT_SAMPLING)], value=GREEDY,
                         allow_blank=False, id="review-decoding")
            yield Input(placeholder="labels file (JSONL)", id="review-labels-path")
        yield Static(id="review-prompt")
        with Horizontal(id="review-answers"):
            for side, letter in SIDES:
                yield AnswerPanel(side, letter)
        yield Static(id="review-tally")
        yield Static(id="review-status")
        yield KeyFooter(compact=True, show_command_palette=False)  # the eight review keys fit in 80 columns

    # ------------------------------------------------------------------ where things are
    def review_dir(self) -> Path:
        return Path(self.app.cfg.output.dir).expanduser() / "review"

    def short(self, source: str) -> str:
        if source == BASE:
            return "base model"
        path, root = Path(source), Path(self.app.cfg.output.dir).expanduser()
        try:
            return str(path.relative_to(root))
        except ValueError:
            return "/".join(path.parts[-3:])

    def on_mount(self) -> None:
        self.query_one("#review-labels-path", Input).value = str(self.review_dir() / "labels.jsonl")
        self.query_one("#review-tally").border_title = "Tally: W/L/T, win = W/(W+L) (95% Wilson interval)"
        self.refresh_sources()
        self.refresh_view()

    def on_screen_resume(self) -> None:
        if not self.is_current:  # a pre-build's round trip (tui/app.py), not a visit
            return
        self.refresh_sources()
        if self.session is None:
            self.resume()
        self.refresh_view()
        self.pump()

    def refresh_sources(self) -> None:
        options = [BASE] + find_adapters(self.app.cfg.output.dir)
        if self.session is not None:  # a resumed session's sources, even if their folders are gone
            options += [s for s in self.session.sources if s not in options]
        first, second = self.query_one("#review-first", Select), self.query_one("#review-second", Select)
        for select in (first, second):
            current = select.value
            select.set_options([(self.short(o), o) for o in options])
            select.value = current if current in options else BASE
        if first.value == second.value == BASE and len(options) > 1:
            second.value = options[1]  # the base model against the newest adapter

    def resume(self) -> None:
        session = latest_unfinished(self.review_dir())
        if session is not None:
            self.open(session, session.next_unjudged() or 0)
            self.resumed = True  # said on the status line (a toast would make snapshots depend on timing)

    def open(self, session: ReviewSession, index: int) -> None:
        self.session, self.current, self.halted, self.resumed = session, index, None, False
        self.requests.clear()
        self.refresh_sources()
        self.query_one("#review-first", Select).value = session.sources[0]
        self.query_one("#review-second", Select).value = session.sources[1]
        self.query_one("#review-prompts", Select).value = TYPED if session.prompt_source == TYPED else HELDOUT
        self.query_one("#review-labels-path", Input).value = session.labels_path
        greedy = session.settings.get("temperature", 0.0) == 0.0
        self.query_one("#review-decoding", Select).value = GREEDY if greedy else CHAT_SAMPLING

    # ------------------------------------------------------------------ starting, typing prompts
    @on(Button.Pressed, "#review-start")
    def start(self) -> ReviewSession | None:
        first = self.query_one("#review-first", Select).value
        second = self.query_one("#review-second", Select).value
        if first == second:
            self.notify("Pick two different sources to compare", severity="warning")
            return None
        settings = self.decoding()
        if settings is None:
            return None
        items, origin = [], TYPED
        if self.query_one("#review-prompts", Select).value == HELDOUT:
            origin = self.app.cfg.evaluation.heldout_path
            if not origin:
                self.notify("evaluation.heldout_path is empty: name a held-out file, or type prompts",
                            severity="error")
                return None
            try:
                items = read_prompts(origin)
            except DatasetError as exc:
                self.notify(str(exc), title="Held-out prompts", severity="error")
                return None
            if not items:
                self.notify(f"{origin}: no prompts found", severity="error")
                return None
        labels = self.query_one("#review-labels-path", Input).value.strip() or \
            str(self.review_dir() / "labels.jsonl")
        session = ReviewSession.new(self.review_dir(), [first, second], dataclasses.asdict(settings), origin, labels)
        for item in items:
            session.add_item(item["messages"], item["origin"])
        if not self.save(session):
            return None
        self.open(session, 0)
        self.refresh_view()
        self.query_one("#answer-left" if items else "#review-typed").focus()
        self.pump()
        return session

    def decoding(self) -> GenerationSettings | None:
        if self.query_one("#review-decoding", Select).value == GREEDY:
            return GenerationSettings(self.app.cfg.evaluation.max_tokens, 0.0, 1.0)
        chat = self.app.get_screen("chat")
        return chat.settings() if chat.is_mounted else CHAT_DEFAULTS  # settings() says what is wrong

    @on(Input.Submitted, "#review-typed")
    def add_typed(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        session = self.session or self.start()
        if session is None:
            return
        index = session.add_item([{"role": "user", "content": text}], TYPED)
        event.input.value = ""
        if not self.save(session):
            return
        if session.judgements[self.current] is not None or index == 0:
            self.current = index  # nothing waits here: go to the new prompt
        self.refresh_view()
        self.pump()

    @on(Input.Changed, "#review-labels-path")
    def labels_path_changed(self, event: Input.Changed) -> None:
        # Only what the user types: a value set by open() must not overwrite a resumed session's path
        if self.session is not None and event.input.has_focus and event.value.strip():
            self.session.labels_path = event.value.strip()
            self.show_status()

    @on(Input.Submitted, "#review-labels-path")
    def labels_path_submitted(self) -> None:
        if self.session is not None:
            self.save(self.session)
        self.action_focus_answers()

    def action_focus_answers(self) -> None:
        self.query_one("#answer-left").focus()

    # ------------------------------------------------------------------ judging, moving, labelling
    def ready(self) -> bool:
        """A session with an item shown whose two answers are in; says why not otherwise."""
        if self.session is None or not self.session.items:
            self.notify("Start a review first (or type a prompt)", severity="warning")
            return False
        if not self.session.answered(self.current):
            self.notify("Both answers are not in yet", severity="warning")
            return False
        return True

    def action_judge(self, verdict: str) -> None:
        if not self.ready():
            return
        session = self.session
        session.judge(self.current, verdict)
        self.save(session)
        self.refresh_view()
        if session.finished:
            self.notify(f"All {len(session.items)} prompts judged", title="Review done")

    def action_move(self, step: int) -> None:
        session = self.session
        if session is None or not session.items:
            return
        index = self.current + step
        if not 0 <= index < len(session.items):
            last = "That was the last prompt" + (": type another" if session.prompt_source == TYPED else "")
            self.notify(last if step > 0 else "This is the first prompt")
            return
        self.current, self.halted = index, None
        self.refresh_view()
        self.pump()

    def action_label(self, label: str) -> None:
        panel = self.focused
        if not isinstance(panel, AnswerPanel):
            self.notify("Focus an answer first (Tab, or Esc from the prompt box)", severity="warning")
            return
        if not self.ready():
            return
        session, index = self.session, self.current
        source = session.source_on(index, panel.side)
        if (given := session.label_of(index, source)) is not None:
            self.notify(f"This answer is already labelled {given}", severity="warning")
            return
        try:
            line = append_labelled(session.labels_path, session.items[index]["messages"],
                                   session.answers[index][source], label)
        except (LabelError, OSError) as exc:
            self.notify(f"Not labelled: {exc}", severity="error")
            return
        session.add_label(index, source, panel.side, label, session.labels_path)
        self.save(session)
        self.refresh_view()
        self.notify(f"{panel.letter} ({panel.side}) labelled {label}: line {line} of {session.labels_path}")

    def save(self, session: ReviewSession) -> bool:
        try:
            session.save()
        except (OSError, SessionError) as exc:
            self.notify(f"The review session could not be saved: {exc}", severity="error")
            return False
        return True

    # ------------------------------------------------------------------ answers from the engine
    def pump(self) -> None:
        """Ask for the next missing answer: the shown prompt's, then the next few prompts'."""
        session = self.session
        if self.in_flight is not None or session is None or self.halted or self.app.training:
            return
        for index in range(self.current, min(len(session.items), self.current + 1 + PREFETCH)):
            missing = [s for s in (0, 1) if session.answers[index][s] is None]
            if missing:
                break
        else:
            return
        source = min(missing, key=lambda s: self.load_cost(session.sources[s]))
        adapter = None if session.sources[source] == BASE else session.sources[source]
        request = Generate(self.app.cfg, tuple(session.items[index]["messages"]),
                           GenerationSettings(**session.settings), adapter, self.next_id, owner="review")
        self.requests[self.next_id] = (session, index, source)
        self.in_flight, self.tokens = self.next_id, 0
        self.next_id += 1
        self.loaded_adapter = adapter or self.loaded_adapter
        self.app.submit(request)
        self.show_status()

    def load_cost(self, source: str) -> int:
        """The engine keeps one adapter loaded and answers as the base with it switched off: the loaded
        adapter first, then another adapter, the base last (it never loads anything)."""
        return 0 if source == self.loaded_adapter else 2 if source == BASE else 1

    @on(msg.AnswerChunk)
    def answer_progress(self, message: msg.AnswerChunk) -> None:
        if message.result.request_id == self.in_flight:
            self.tokens = message.result.tokens
            self.show_status()

    @on(msg.AnswerDone)
    def answer_done(self, message: msg.AnswerDone) -> None:
        done = message.result
        if done.request_id == self.in_flight:
            self.in_flight = None
        job = self.requests.pop(done.request_id, None)
        if job is not None and job[0] is self.session and not done.cancelled:
            session, index, source = job
            session.answers[index][source] = done.text.strip()
            self.save(session)
            if index == self.current:
                self.refresh_view()
        self.pump()  # a cancelled answer (Esc on the Chat screen stops any) is asked for again
        self.show_status()

    @on(msg.EngineFailed)
    def answer_failed(self, message: msg.EngineFailed) -> None:
        self.in_flight = None
        self.requests.clear()
        self.halted = message.result.message  # n/p or a new session try again
        self.refresh_view()

    # ------------------------------------------------------------------ what is shown
    def refresh_view(self) -> None:
        session, prompt = self.session, self.query_one("#review-prompt", Static)
        panels = {p.side: p for p in self.query(AnswerPanel)}
        if session is None or not session.items:
            prompt.border_title = "Prompt"
            prompt.update("Pick two sources and the prompts, then Start; or type prompts below (Enter adds one).")
            for side, letter in SIDES:
                panels[side].show(f"{letter} ({side})", "")
                panels[side].remove_class("winner")
        else:
            index = self.current
            item, verdict = session.items[index], session.verdict(index)
            earlier = len(item["messages"]) - 1
            prompt.border_title = escape(f"Prompt {index + 1}/{len(session.items)} · {item['origin']}"
                                   + (f" · after {earlier} earlier turn{'s' * (earlier > 1)}" if earlier else "")
                                   + (f" · judged: {VERDICT_TEXT[verdict]}" if verdict else ""))
            prompt.update(Text(item["messages"][-1]["content"]))
            both = session.answered(index)
            for side, letter in SIDES:
                source = session.source_on(index, side)
                title = f"{letter} ({side})" + (f": {self.short(session.sources[source])}" if verdict else "")
                if (label := session.label_of(index, source)) is not None:
                    title += f" · {label}"
                waiting = f"no answer: {self.halted}\n(n/p to try again)" if self.halted else "answering…"
                panels[side].show(title, session.answers[index][source] if both else waiting)
                panels[side].set_class(verdict == side, "winner")
        self.query_one("#review-tally", Static).update(self.tally_text())
        self.show_status()

    def tally_text(self) -> Text:
        if self.session is None:
            return Text("No review yet.")
        return Text("\n".join(t.describe(self.short(t.source)) for t in self.session.tally()))

    def show_status(self) -> None:
        session = self.session
        labels = session.labels_path if session else self.query_one("#review-labels-path", Input).value
        parts = [f"labels → {labels}"]
        if session is not None:
            parts.append(f"{session.judged}/{len(session.items)} judged · "
                         f"{'resumed ' if self.resumed else ''}session {session.id}")
            if self.halted:
                parts.append(f"stopped: {self.halted} (n/p to try again)")
            elif self.in_flight is not None:
                parts.append(f"answering… {self.tokens} tokens")
            elif self.app.training and session.items and not session.answered(self.current):
                parts.append("the engine is training: answers come after the run")
        self.query_one("#review-status", Static).update(Text(" · ".join(parts)))
