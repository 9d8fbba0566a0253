"""Train screen: start, pause, resume, stop, save a checkpoint now; progress with ETA. The run's figures are
panels (tui/widgets/train/): loss chart with validation points, run stats, rewards (KTO/DPO/ORPO runs only),
memory gauges, checkpoints, log;
this screen keeps the controls and forwards each run event to the panels that paint it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message

from textual.widgets import Button, Header, Input, ProgressBar, Static

from engine.config.validation import validate
from engine.train.run_folder import run_state
from engine.protocol import Event, StartTraining
from tui import messages as msg
from tui.screens.base import AppScreen
from tui.screens.confirm import ConfirmScreen
from tui.widgets.footer import KeyFooter
from tui.widgets.train import CheckpointTable, EventLog, LossChart, MemoryGauges, RewardsPanel, RunStats

if TYPE_CHECKING:
    from tui.external import ExternalRun


def fresh_run_name(output_dir: Path, name: str) -> str:
    """`name-2`, `name-3`, ...: the first that names no folder yet."""
    k = 2
    while (output_dir / f"{name}-{k}").exists():
        k += 1
    return f"{name}-{k}"


class TrainScreen(AppScreen):
    AUTO_FOCUS = "#start"
    BINDINGS = [
        Binding("ctrl+t", "start", "Start"),
        Binding("ctrl+p", "pause_resume", "Pause/Resume"),
        Binding("ctrl+x", "stop", "Stop"),
        Binding("ctrl+s", "save_now", "Save checkpoint"),
        Binding("ctrl+o", "follow", "Follow/launch"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.state = "idle"
        self.external: ExternalRun | None = None  # a run in other processes that this screen follows

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
                yield RunStats(id="train-stats")
                yield LossChart()
                yield RewardsPanel(id="rewards")
                yield MemoryGauges()
            with Vertical(id="train-right"):
                yield Static("checkpoints", classes="muted")
                yield CheckpointTable(id="checkpoints")
        yield EventLog(id="train-log")
        yield KeyFooter()

    def on_mount(self) -> None:
        # The panels, looked up once: each step reaches four of them.
        self.progress = self.query_one("#train-progress", ProgressBar)
        self.state_label = self.query_one("#train-state", Static)
        self.loss_chart = self.query_one(LossChart)
        self.rewards = self.query_one(RewardsPanel)
        self.stats = self.query_one(RunStats)
        self.gauges = self.query_one(MemoryGauges)
        self.checkpoints = self.query_one(CheckpointTable)
        self.log_panel = self.query_one(EventLog)
        self._set_buttons("idle")

    # ------------------------------------------------------------ controls

    def _set_buttons(self, state: str) -> None:
        self.state = state
        self.query_one("#start", Button).disabled = state not in ("idle", "done")
        self.query_one("#pause", Button).disabled = state != "running"
        self.query_one("#resume", Button).disabled = state != "paused"
        self.query_one("#stop", Button).disabled = state not in ("running", "paused", "starting") and not (
            state == "following" and self.external is not None and self.external.launched)
        self.state_label.update(state)
        self.refresh_bindings()  # ctrl+s is on only while a run is running or paused

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "save_now":
            return True if self.app.control and self.state in ("running", "paused") else None  # None: dimmed
        return True

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

    def resume_run(self, run_dir: str, cfg) -> bool:
        """Resume the run in `run_dir` with `cfg`, its own settings (the Runs screen's r); refused, and said,
        while a run is on this screen or when those settings are not valid."""
        if self.app.training or self.state not in ("idle", "done"):
            self.notify("A run is already on the Train screen: stop it first", severity="warning")
            return False
        errors = [i for i in validate(cfg) if i.severity == "error"]
        if errors:
            self.notify(f"Cannot resume {run_dir}: {errors[0].field}: {errors[0].message}", severity="error",
                        timeout=10)
            return False
        self._start(copy.deepcopy(cfg), resume=run_dir)
        return True

    def _clear_run(self) -> None:
        """A new run on this screen: none of the last run's figures stay."""
        self.loss_chart.clear()
        self.rewards.clear()
        self.stats.forget_best()
        self.checkpoints.clear_run()
        self.log_panel.clear()

    def _start(self, cfg, resume: str | None = None) -> None:
        self._clear_run()
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
        self._clear_run()
        self.log_panel.write(self.external.describe())
        self._set_buttons("following")
        self.run_worker(self._follow, thread=True, exclusive=True, group="follow", exit_on_error=False)

    class FollowEnded(Message):
        """The followed run ended (`end`: its Finished or Failed), or the following stopped (None), by itself or
        because reading the run failed (`error`)."""

        def __init__(self, end: Event | None, error: str | None = None) -> None:
            super().__init__()
            self.end, self.error = end, error

    def _follow(self) -> None:
        """The follow worker's thread: the run's events and then its end, all through this screen's queue,
        so that the end is shown after the last event."""
        from textual.worker import get_current_worker
        worker = get_current_worker()
        end, error = None, None
        try:
            end = self.external.run(self._post_event, lambda: worker.is_cancelled)
        except Exception as exc:  # metrics.jsonl became unreadable, ...: the screen must not stay "following"
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self.post_message(self.FollowEnded(end, error))

    def _post_event(self, event: Event) -> None:
        message = msg.engine_message(event)
        if message is not None:
            self.post_message(message)

    @on(FollowEnded)
    def followed(self, message: FollowEnded) -> None:
        self._set_buttons("done")
        if message.error:
            self.notify(f"Following stopped: {message.error}", title="Cannot follow", severity="error", timeout=10)
        elif message.end is None and self.external.problem():
            self.notify(self.external.problem(), title="Distributed run", severity="error", timeout=15)

    @on(Button.Pressed, "#stop")
    def action_stop(self) -> None:
        if self.state == "following" and self.external is not None:
            self.external.stop()  # the launched ranks save a checkpoint, then stop together
            self.notify("Stopping: the run saves a checkpoint first…")
            return
        if self.app.control:
            self.app.control.stop()
            self._set_buttons("stopping")
            self.notify("Stopping: saving a checkpoint first…")

    def action_save_now(self) -> None:
        """A checkpoint of the current step (reason "manual"), at once while paused; the run goes on as it was."""
        if self.app.control and self.state in ("running", "paused"):
            self.app.control.save_now()
            self.notify("Saving a checkpoint…")

    # ------------------------------------------------------------ engine events, forwarded to the panels

    @on(msg.RunLogged)
    def log_event(self, message: msg.RunLogged) -> None:
        self.log_panel.add(message.result)

    @on(msg.TrainingBegan)
    def training_began(self) -> None:
        self._set_buttons("starting")

    @on(msg.RunPhase)
    def show_phase(self, message: msg.RunPhase) -> None:
        self.state_label.update(f"preparing: {message.result.name}")
        self.progress.update(total=1.0, progress=message.result.fraction)

    @on(msg.RunStarted)
    def run_started(self, message: msg.RunStarted) -> None:
        started = message.result
        self.progress.update(total=started.total_steps, progress=started.start_step)
        self.stats.show_started(started)
        if self.state != "following":
            self._set_buttons("running")

    @on(msg.RunStep)
    def show_step(self, message: msg.RunStep) -> None:
        step = message.result
        self.progress.update(total=step.total_steps, progress=step.step)
        self.loss_chart.add_step(step)
        self.rewards.add_step(step)
        self.stats.show_step(step)
        self.gauges.show(step.memory)

    @on(msg.RunEval)
    def show_eval(self, message: msg.RunEval) -> None:
        self.loss_chart.add_eval(message.result)
        self.rewards.add_eval(message.result)
        self.stats.add_eval(message.result)
        self.checkpoints.add_eval(message.result)

    @on(msg.RunCheckpointSaved)
    def show_checkpoints(self, message: msg.RunCheckpointSaved) -> None:
        self.checkpoints.show_saved(message.result)

    @on(msg.RunPaused)
    def paused(self) -> None:
        if self.state != "following":
            self._set_buttons("paused")

    @on(msg.RunResumed)
    def resumed(self) -> None:
        if self.state != "following":
            self._set_buttons("running")

    @on(msg.RunFailed)
    def failed(self, message: msg.RunFailed) -> None:
        self.notify(message.result.message, title="Training failed", severity="error", timeout=15)

    @on(msg.RunFinished)
    def finished(self, message: msg.RunFinished) -> None:
        e = message.result
        if not e.adapter_path:  # stopped while preparing
            self.notify("Stopped before training began: nothing was trained or saved", title="Stopped", timeout=10)
        else:
            self.notify(f"Finished at step {e.step}; adapter in {e.adapter_path}",
                        title="Stopped" if e.stopped_early else "Training finished", timeout=10)

    @on(msg.TrainingOver)
    def training_over(self) -> None:
        self._set_buttons("done")
