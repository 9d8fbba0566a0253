"""A KTO/DPO/ORPO run's rewards: desirable/undesirable (KTO) or chosen/rejected (DPO, ORPO) reward, their
margin, the accuracy and KTO's KL (z0) or ORPO's NLL, for the last step and the last validation, with the
margin over the steps as a sparkline. Hidden for SFT runs (their events carry no `preference`)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from engine.protocol import Eval, PreferenceStats, Step

MARGIN_POINTS = 200  # newest margins shown in the sparkline


def _signed(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:+.3f}"


def _extra(stats: PreferenceStats) -> str:
    """KTO's KL estimate, ORPO's NLL term; DPO has neither."""
    value = stats.kl if stats.kl is not None else stats.nll
    return "" if value is None or value != value else f"{value:.4f}"


def _extra_name(method: str) -> str:
    return {"kto": "KL", "orpo": "NLL"}.get(method, "")


def rewards_row(name: str, stats: PreferenceStats | None) -> str:
    if stats is None:
        return f"{name:<12}" + "-"
    rewards = f"{_signed(stats.chosen_reward)} / {_signed(stats.rejected_reward)}"
    return (f"{name:<12}{rewards:<25}{_signed(stats.margin):>8}{stats.accuracy:>10.0%}"
            f"{_extra(stats):>10}")


class RewardsPanel(Vertical):
    DEFAULT_CSS = """
    RewardsPanel { height: auto; display: none; }
    RewardsPanel.-shown { display: block; }
    RewardsPanel #rewards-table { height: 3; }
    RewardsPanel #margin-row { height: 1; }
    RewardsPanel #margin-label { width: 12; }
    RewardsPanel #margin-chart { width: 1fr; height: 1; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.margins: list[float] = []
        self.last_step: tuple[int, PreferenceStats] | None = None
        self.last_eval: tuple[int, PreferenceStats] | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="rewards-table")
        with Horizontal(id="margin-row"):
            yield Static("margin", id="margin-label", classes="muted")
            yield Sparkline([], id="margin-chart")

    def clear(self) -> None:
        """A new run: hidden until its first step or validation with rewards."""
        self.margins, self.last_step, self.last_eval = [], None, None
        self.query_one("#margin-chart", Sparkline).data = []
        self.query_one("#rewards-table", Static).update("")
        self.remove_class("-shown")

    def add_step(self, step: Step) -> None:
        if step.preference is None:
            return
        self.last_step = (step.step, step.preference)
        margin = step.preference.margin
        if margin is not None and margin == margin:
            self.margins.append(margin)
            # Sparkline.data is reactive: assign a new list, never mutate the old one
            self.query_one("#margin-chart", Sparkline).data = list(self.margins[-MARGIN_POINTS:])
        self._show()

    def add_eval(self, evaluation: Eval) -> None:
        if evaluation.preference is None:
            return
        self.last_eval = (evaluation.step, evaluation.preference)
        self._show()

    def _show(self) -> None:
        latest = (self.last_step or self.last_eval)[1]
        names = "desirable / undesirable" if latest.method == "kto" else "chosen / rejected"
        step = f"step {self.last_step[0]}" if self.last_step else "step"
        val = f"val {self.last_eval[0]}" if self.last_eval else "validation"
        self.query_one("#rewards-table", Static).update(
            f"[b]{latest.method.upper():<12}[/b]{names:<25}{'margin':>8}{'accuracy':>10}"
            f"{_extra_name(latest.method):>10}\n"
            + rewards_row(step, self.last_step and self.last_step[1]) + "\n"
            + rewards_row(val, self.last_eval and self.last_eval[1]))
        self.add_class("-shown")
