"""Train screen: start, pause, resume, stop; progress with ETA; loss sparkline with validation points;
learning rate and throughput; memory gauges; checkpoints (best marked); a scrolling log."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.markup import escape

from textual.widgets import Button, DataTable, Header, Input, ProgressBar, RichLog, Sparkline, Static

from engine import protocol as ev
from engine.config.validation import validate
from engine.train.run_log import describe
from engine.train.run_folder import run_state
from engine.protocol import StartTraining, TrainingEnded, TrainingStarted
from tui.screens.base import AppScreen
from tui.screens.confirm import ConfirmScreen
from tui.widgets.footer import KeyFooter
from tui.widgets.gauge import Gauge

LOSS_POINTS = 200  # newest points shown in the sparkline


def fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "–"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fresh_run_name(output_dir: Path, name: str) -> str:
    """`name-2`, `name-3`, ...: the first that names no folder yet."""
    k = 2
    while (output_dir / f"{name}-{k}").exists():
        k += 1
    return f"{name}-{k}"


def checkpoint_step(path: str) -> int | None:
    """The step in a checkpoint folder's name (step_000042), None for any other name."""
    tail = path.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


class TrainScreen(AppScreen):
    AUTO_FOCUS = "#start"
    BINDINGS = [
        Binding("ctrl+t", "start", "Start"),
        Binding("ctrl+p", "pause_resume", "Pause/Resume"),
        Binding("ctrl+x", "stop", "Stop"),
        Binding("ctrl+o", "follow", "Follow/launch"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="toolbar"):
            yield Button("Start", id="start", variant="success")
            yield Button("Pause", id="pause", disabled=True)
            yield Button("Resume", id="resume", disabled=True)
            yield Button("Stop", id="stop", variant="error", disabled=True)
            yield Static("idle", id="train-state")
        yield Input(placeholder="ctrl+o: follow a run folder, or launch on the hosts of an mlx.launch hosts file",
                    id="external")
        yield ProgressBar(total=100, show_eta=False, id="train-progress")
        with Horizontal(id="train-body"):
            with Vertical(id="train-left"):
                yield Static("", id="train-stats")
                yield Static("training loss", classes="muted")
                yield Sparkline([], id="loss-chart")
                yield Static("", id="val-points", classes="muted")
                yield Gauge("system RAM", id="g-ram")
                yield Gauge("process", id="g-rss")
                yield Gauge("MLX active", id="g-active")
                yield Gauge("MLX peak", id="g-peak")
            with Vertical(id="train-right"):
                yield Static("checkpoints", classes="muted")
                yield DataTable(id="checkpoints", cursor_type="row")
        yield RichLog(id="train-log", max_lines=2000, wrap=True, markup=False)
        yield KeyFooter()

    def on_mount(self) -> None:
        self.losses: list[float] = []
        self.vals: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.query_one("#checkpoints", DataTable).add_columns("step", "reason", "val loss", "")
        self._set_buttons("idle")

    # ------------------------------------------------------------ controls

    def _set_buttons(self, state: str) -> None:
        self.state = state
        self.query_one("#start", Button).disabled = state not in ("idle", "done")
        self.query_one("#pause", Button).disabled = state != "running"
        self.query_one("#resume", Button).disabled = state != "paused"
        self.query_one("#stop", Button).disabled = state not in ("running", "paused", "starting") and not (
            state == "following" and getattr(self, "external", None) and self.external.launched)
        self.query_one("#train-state", Static).update(state)

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        if self.app.training or self.state not in ("idle", "done"):
            return
        errors = [i for i in validate(self.app.cfg) if i.severity == "error"]
        if errors:
            self.notify(f"Fix the config first: {errors[0].field}: {errors[0].message}", severity="error", timeout=8)
            return
        cfg = copy.deepcopy(self.app.cfg)
        if cfg.output.run_name:
            self._start_beside_earlier_run(cfg)
        else:  # a new timestamped folder: nothing there to lose
            self._start(cfg)

    def _start_beside_earlier_run(self, cfg) -> None:
        """Start in the run name's folder, unless a run is there already: resume it (if it did not finish) or
        start a new run beside it, as the user picks; never over it."""
        output_dir = Path(cfg.output.dir).expanduser()
        run_dir = output_dir / cfg.output.run_name
        state = run_state(run_dir)
        fresh = fresh_run_name(output_dir, cfg.output.run_name)

        def start_fresh() -> None:
            cfg.output.run_name = fresh  # the earlier run stays as it is
            self.notify(f"Starting a new run in {output_dir / fresh}; {run_dir} is kept", timeout=8)
            self._start(cfg)

        if state.state == "running":
            who = f"process {state.pid}" if state.pid else "another process"
            self.notify(f"{who} is training in {run_dir}: follow it (ctrl+o) or set another output.run_name",
                        severity="error", timeout=10)
        elif state.resumable and state.state == "interrupted":
            def answer(resume: bool | None) -> None:
                if resume:
                    self._start(cfg, resume=str(run_dir))
                elif resume is False:
                    start_fresh()
            self.app.push_screen(ConfirmScreen(
                f"{run_dir} holds a run that did not finish (last checkpoint: step {state.last_step}). "
                "Resume it, or start a new run beside it?", yes=f"Resume from step {state.last_step}",
                no=f"New run {fresh}"), answer)
        elif state.state != "empty":
            self.app.push_screen(ConfirmScreen(
                f"{run_dir} holds a finished run. Start a new run beside it as {fresh}?", yes=f"New run {fresh}"),
                lambda yes: start_fresh() if yes else None)
        else:
            self._start(cfg)

    def _start(self, cfg, resume: str | None = None) -> None:
        self.losses, self.vals, self.best_step = [], [], None
        self.query_one("#checkpoints", DataTable).clear()
        self.query_one("#loss-chart", Sparkline).data = []
        self.query_one("#train-log", RichLog).clear()
        self._set_buttons("starting")
        self.app.submit(StartTraining(cfg, resume=resume))

    @on(Button.Pressed, "#pause")
    def pause(self) -> None:
        if self.app.control:
            self.app.control.pause()
            self._set_buttons("pausing")

    @on(Button.Pressed, "#resume")
    def resume(self) -> None:
        if self.app.control:
            self.app.control.resume()

    def action_pause_resume(self) -> None:
        if self.state == "running":
            self.pause()
        elif self.state == "paused":
            self.resume()

    @on(Input.Submitted, "#external")
    def action_follow(self) -> None:
        """Follow a run another process writes (its folder), or start a distributed run on the hosts of an
        `mlx.launch` hosts file and follow it: the same live screen, fed from metrics.jsonl."""
        from pathlib import Path

        from tui.external import ExternalRun
        text = self.query_one("#external", Input).value.strip()
        if not text:
            self.query_one("#external", Input).focus()
            return
        if self.app.training or self.state not in ("idle", "done"):
            self.notify("A run is already on this screen", severity="warning")
            return
        path = Path(text).expanduser()
        try:
            self.external = ExternalRun.launch(self.app.cfg, path) if path.is_file() else ExternalRun.follow(path)
        except ValueError as exc:
            self.notify(str(exc), title="Cannot follow", severity="error", timeout=10)
            return
        self.losses, self.vals, self.best_step = [], [], None
        self.query_one("#checkpoints", DataTable).clear()
        self.query_one("#train-log", RichLog).clear()
        self.query_one("#train-log", RichLog).write(self.external.describe())
        self._set_buttons("following")
        self.run_worker(self._follow, thread=True, exclusive=True, group="follow", exit_on_error=False)

    def _follow(self) -> None:
        from textual.worker import get_current_worker
        from tui.messages import EngineMessage
        worker = get_current_worker()
        end = self.external.run(lambda e: self.app.post_message(EngineMessage(e)), lambda: worker.is_cancelled)
        self.app.call_from_thread(self._followed, end)

    def _followed(self, end) -> None:
        self._set_buttons("done")
        if end is None and self.external.problem():
            self.notify(self.external.problem(), title="Distributed run", severity="error", timeout=15)

    @on(Button.Pressed, "#stop")
    def action_stop(self) -> None:
        if self.state == "following" and getattr(self, "external", None):
            self.external.stop()  # the launched ranks save a checkpoint, then stop together
            self.notify("Stopping: the run saves a checkpoint first…")
            return
        if self.app.control:
            self.app.control.stop()
            self._set_buttons("stopping")
            self.notify("Stopping: saving a checkpoint first…")

    # ------------------------------------------------------------ engine events

    def handle_engine(self, e) -> None:
        log = self.query_one("#train-log", RichLog)
        line = describe(e) if isinstance(e, (ev.Started, ev.Eval, ev.CheckpointSaved, ev.Sample, ev.Warning,
                                              ev.Finished, ev.Failed, ev.Paused, ev.Resumed)) else None
        if line:
            log.write(time.strftime("%H:%M:%S ") + line)
        if isinstance(e, TrainingStarted):
            self._set_buttons("starting")
        elif isinstance(e, ev.Phase):
            self.query_one("#train-state", Static).update(f"preparing: {e.name}")
            self.query_one("#train-progress", ProgressBar).update(total=1.0, progress=e.fraction)
        elif isinstance(e, ev.Started):
            self.total = e.total_steps
            self.query_one("#train-progress", ProgressBar).update(total=e.total_steps, progress=e.start_step)
            if self.state != "following":
                self._set_buttons("running")
            self.started = e
        elif isinstance(e, ev.Step):
            self.on_step(e)
        elif isinstance(e, ev.Eval):
            self.vals.append((e.step, e.val_loss))
            if e.is_best:
                self.best_step = e.step
            self.query_one("#val-points", Static).update(
                "validation: " + "  ".join(f"{s}: {v:.3f}" for s, v in self.vals[-8:]))
        elif isinstance(e, ev.CheckpointSaved):
            table = self.query_one("#checkpoints", DataTable)
            table.clear()
            vals = dict(self.vals)
            for path in e.kept:
                step = checkpoint_step(path)
                val = vals.get(step)
                table.add_row(str(step), e.reason if step == e.step else "",
                              f"{val:.4f}" if val is not None else "", "★ best" if step == self.best_step else "")
        elif isinstance(e, ev.Paused) and self.state != "following":
            self._set_buttons("paused")
        elif isinstance(e, ev.Resumed) and self.state != "following":
            self._set_buttons("running")
        elif isinstance(e, ev.Failed):
            self.notify(e.message, title="Training failed", severity="error", timeout=15)
        elif isinstance(e, ev.Finished) and not e.adapter_path:  # stopped while preparing
            self.notify("Stopped before training began: nothing was trained or saved", title="Stopped", timeout=10)
        elif isinstance(e, ev.Finished):
            self.notify(f"Finished at step {e.step}; adapter in {e.adapter_path}",
                        title="Stopped" if e.stopped_early else "Training finished", timeout=10)
        elif isinstance(e, TrainingEnded):
            self._set_buttons("done")

    def on_step(self, e: ev.Step) -> None:
        self.losses.append(e.loss)
        # Sparkline.data is reactive: assign a new list, never mutate the old one
        self.query_one("#loss-chart", Sparkline).data = list(self.losses[-LOSS_POINTS:])
        self.query_one("#train-progress", ProgressBar).update(total=e.total_steps, progress=e.step)
        best = min((v for _, v in self.vals), default=None)
        self.query_one("#train-stats", Static).update(
            f"step [b]{e.step}[/b] / {e.total_steps}   epoch {e.epoch:.2f}   ETA {fmt_eta(e.eta_seconds)}\n"
            f"loss [b]{e.loss:.4f}[/b]   lr {e.learning_rate:.3g}   grad norm {e.grad_norm:.3f}\n"
            f"{e.tokens_per_sec:,.0f} tokens/s   {e.steps_per_sec:.3f} steps/s"
            + (f"   best val {best:.4f}" if best is not None else "")
            + (f"\n{escape(self.started.device)}  BLAS {self.started.blas}  {self.started.dtype}"
               if getattr(self, "started", None) else ""))
        m = e.memory
        self.query_one("#g-ram", Gauge).set(m.system_used_bytes, m.system_total_bytes)
        self.query_one("#g-rss", Gauge).set(m.rss_bytes, m.system_total_bytes)
        self.query_one("#g-active", Gauge).set(m.mlx_active_bytes, m.system_total_bytes)
        self.query_one("#g-peak", Gauge).set(m.mlx_peak_bytes, m.system_total_bytes)
