"""Where the run is: step, epoch and ETA, loss, learning rate, gradient norm, throughput, best validation
loss, and the device it runs on."""

from __future__ import annotations

from textual.markup import escape
from textual.widgets import Static

from engine.protocol import Eval, Started, Step


def fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "–"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunStats(Static):
    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.started: Started | None = None
        self.best_val: float | None = None

    def forget_best(self) -> None:
        """A new run has its own best validation loss; the last run's figures stay until its first step."""
        self.best_val = None

    def show_started(self, started: Started) -> None:
        self.started = started

    def add_eval(self, evaluation: Eval) -> None:
        self.best_val = evaluation.val_loss if self.best_val is None else min(self.best_val, evaluation.val_loss)

    def show_step(self, e: Step) -> None:
        device = f"\n{escape(self.started.device)}  BLAS {self.started.blas}  {self.started.dtype}" \
            if self.started else ""
        self.update(
            f"step [b]{e.step}[/b] / {e.total_steps}   epoch {e.epoch:.2f}   ETA {fmt_eta(e.eta_seconds)}\n"
            f"loss [b]{e.loss:.4f}[/b]   lr {e.learning_rate:.3g}   grad norm {e.grad_norm:.3f}\n"
            f"{e.tokens_per_sec:,.0f} tokens/s   {e.steps_per_sec:.3f} steps/s"
            + (f"   best val {self.best_val:.4f}" if self.best_val is not None else "")
            + device)
