"""The training loss as a sparkline of the newest steps, with the latest validation points below it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from engine.protocol import Eval, Step

LOSS_POINTS = 200  # newest points shown in the sparkline
VAL_POINTS = 8  # newest validation points listed


class LossChart(Vertical):
    DEFAULT_CSS = "LossChart { height: auto; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.losses: list[float] = []
        self.vals: list[tuple[int, float]] = []

    def compose(self) -> ComposeResult:
        yield Static("training loss", classes="muted")
        yield Sparkline([], id="loss-chart")
        yield Static("", id="val-points", classes="muted")

    def clear(self) -> None:
        self.losses, self.vals = [], []
        self.query_one(Sparkline).data = []
        self.query_one("#val-points", Static).update("")

    def add_step(self, step: Step) -> None:
        self.losses.append(step.loss)
        # Sparkline.data is reactive: assign a new list, never mutate the old one
        self.query_one(Sparkline).data = list(self.losses[-LOSS_POINTS:])

    def add_eval(self, evaluation: Eval) -> None:
        self.vals.append((evaluation.step, evaluation.val_loss))
        self.query_one("#val-points", Static).update(
            "validation: " + "  ".join(f"{s}: {v:.3f}" for s, v in self.vals[-VAL_POINTS:]))
