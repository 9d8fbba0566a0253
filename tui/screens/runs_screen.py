"""Runs screen (F5): every run under output.dir in a table, newest first (status, progress, best validation
loss, scores); marked runs' loss and validation curves overlaid in one plot and the settings that differ
between them; resume a killed or stopped run on the Train screen, delete a run, chat with a run's adapter.

The runs folder is read on a worker thread (engine/train/run_index.py; a rescan re-reads only the
metrics.jsonl files that changed) each time the screen is shown, on ctrl+r, and every few seconds while a
listed run is training."""

from __future__ import annotations

import time

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Header, Static

from engine.train.run_index import RunIndexError, RunInfo, config_diff, delete_run, list_runs, run_settings
from tui.screens.base import AppScreen
from tui.screens.confirm import ConfirmScreen
from tui.widgets.footer import KeyFooter
from tui.widgets.plot import LinePlot, Series

COLUMNS = (("mark", ""), ("name", "run"), ("status", "status"), ("method", "method"), ("steps", "steps"),
           ("time", "time"), ("best", "best val"), ("scores", "scores"), ("started", "started"))
STATUS_STYLE = {"finished": "green", "stopped": "yellow", "failed": "red", "running": "cyan", "killed": "magenta"}
MARK = "●"
LIVE_RESCAN_SECONDS = 3.0


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def scores_text(scores: dict[str, float], most: int = 2) -> str:
    """A few scores by their metric's name ("exact 80%"), rates in [0, 1] as percentages; where the base
    model's score is beside the tuned one, the tuned one."""
    shown = []
    for key, value in scores.items():
        parts = key.split(".")
        if parts[-1] == "base" and len(parts) > 1:
            continue
        name = parts[-2] if parts[-1] in ("tuned", "adapter") and len(parts) > 1 else parts[-1]
        shown.append(f"{name} {value:.0%}" if 0 <= value <= 1 else f"{name} {value:.3g}")
    return " ".join(shown[:most]) or "-"


def steps_text(run: RunInfo) -> str:
    if run.step is None:
        return "-"
    return f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step)


class RunsScreen(AppScreen):
    AUTO_FOCUS = "#runs-table"
    BINDINGS = [
        Binding("space", "toggle_mark", "Mark to compare"),
        Binding("r", "resume", "Resume"),
        Binding("d", "delete", "Delete"),
        Binding("c", "chat", "Chat with it"),
        Binding("ctrl+r", "rescan", "Rescan"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, RunInfo] = {}  # by folder name, newest first
        self.marked: list[str] = []  # runs marked for comparison, in the order marked
        self.row_cells: dict[str, list] = {}  # the table's cells by run, as shown
        self.side_text: Text | None = None  # the side panel's text, as shown
        self.scans = 0  # the newest scan's number: an older scan's late result is dropped

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="runs-summary")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="runs-bottom"):
            yield LinePlot(id="runs-plot")
            with VerticalScroll(id="runs-side"):
                yield Static("", id="runs-diff")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.table = self.query_one("#runs-table", DataTable)
        for key, label in COLUMNS:
            self.table.add_column(label, key=key)
        self.set_interval(LIVE_RESCAN_SECONDS, self._rescan_live)

    def on_screen_resume(self) -> None:
        if self.is_current:  # not a pre-build's round trip (tui/app.py)
            self.scan()

    # ------------------------------------------------------------ reading the runs folder

    def action_rescan(self) -> None:
        self.scan()

    def _rescan_live(self) -> None:
        if self.is_current and any(run.status == "running" for run in self.runs.values()):
            self.scan()

    def scan(self) -> None:
        self.scans += 1
        number, folder = self.scans, self.app.cfg.output.dir
        self.run_worker(lambda: self._read(number, folder), thread=True, group="runs-scan", exit_on_error=False)

    def _read(self, number: int, folder: str) -> None:
        runs = list_runs(folder)
        self.app.call_from_thread(self._show, number, folder, runs)

    def _show(self, number: int, folder: str, runs: list[RunInfo]) -> None:
        if number != self.scans:
            return
        cursor = self.current_run()
        self.runs = {run.name: run for run in runs}
        self.marked = [name for name in self.marked if name in self.runs]
        rows = {run.name: self._cells(run) for run in runs}
        if list(rows) == list(self.row_cells):  # the same runs in the same order (a rescan while one trains):
            for name, cells in rows.items():  # only the cells that changed, not the whole table
                for (key, _), new, old in zip(COLUMNS, cells, self.row_cells[name]):
                    if new != old:
                        self.table.update_cell(name, key, new, update_width=True)
        else:
            self.table.clear()
            for name, cells in rows.items():
                self.table.add_row(*cells, key=name)
            if cursor is not None and cursor.name in self.runs:
                self.table.move_cursor(row=self.table.get_row_index(cursor.name), animate=False)
        self.row_cells = rows
        live = sum(run.status == "running" for run in runs)
        self.query_one("#runs-summary", Static).update(
            f"{len(runs)} run{'s' * (len(runs) != 1)} in {folder}" + (f", {live} training" if live else "") +
            ("  ·  space marks runs to compare" if runs else ": none yet (train one on F3)"))
        self.show_selection()

    def _cells(self, run: RunInfo) -> list:
        best = "-" if run.best_val_loss is None else f"{run.best_val_loss:.4f}"
        started = "-" if run.started is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started))
        return [MARK if run.name in self.marked else " ", run.name,
                Text(run.status, style=STATUS_STYLE.get(run.status, "")), run.method or "-", steps_text(run),
                duration_text(run.seconds), best, scores_text(run.scores), started]

    def current_run(self) -> RunInfo | None:
        """The run under the table's cursor."""
        if not self.runs or not (0 <= self.table.cursor_row < self.table.row_count):
            return None
        key = self.table.coordinate_to_cell_key((self.table.cursor_row, 0)).row_key.value
        return self.runs.get(key)

    # ------------------------------------------------------------ marking and comparing

    @on(DataTable.RowSelected, "#runs-table")
    def action_toggle_mark(self) -> None:
        run = self.current_run()
        if run is None:
            return
        if run.name in self.marked:
            self.marked.remove(run.name)
        else:
            self.marked.append(run.name)
        mark = self.row_cells[run.name][0] = MARK if run.name in self.marked else " "
        self.table.update_cell(run.name, "mark", mark)
        self.show_selection()

    @on(DataTable.RowHighlighted, "#runs-table")
    def show_selection(self) -> None:
        """The plot and the side panel: the marked runs (or the one under the cursor when none is marked)."""
        shown = [self.runs[name] for name in self.marked] or [r for r in [self.current_run()] if r]
        series = []
        for run in shown:
            series += [Series(f"{run.name} train", run.train_curve), Series(f"{run.name} val", run.val_curve)]
        self.query_one("#runs-plot", LinePlot).set_series(series)  # redrawn only if they changed
        text = self._diff_text(shown) if len(self.marked) >= 2 else self._details_text(shown[0]) if shown else Text()
        if text != self.side_text:  # a rescan while a run trains mostly changes nothing shown here
            self.side_text = text
            self.query_one("#runs-diff", Static).update(text)

    @staticmethod
    def _diff_text(runs: list[RunInfo]) -> Text:
        diff = config_diff(runs)
        text = Text("settings that differ\n", style="bold")
        if not diff:
            text.append("none: the marked runs have the same settings", style="dim")
        for key, values in diff.items():
            text.append(f"{key}\n", style="bold cyan")
            for run, value in zip(runs, values):
                text.append(f"  {run.name}: ", style="dim")
                text.append(f"{'-' if value is None else value}\n")
        return text

    @staticmethod
    def _details_text(run: RunInfo) -> Text:
        text = Text(f"{run.name}\n", style="bold")
        text.append(f"{run.path}\n", style="dim")
        text.append(run.status, style=STATUS_STYLE.get(run.status, ""))
        if run.pid:
            text.append(f" (process {run.pid})")
        text.append("\n")
        if run.message:
            text.append(f"{run.message}\n", style="red")
        if run.resumable:
            text.append(f"r resumes it from step {run.last_checkpoint}\n")
        if run.adapter is not None:
            text.append(f"c chats with {run.adapter.relative_to(run.path)}\n")
        for key, value in run.scores.items():
            text.append(f"{key}: {value:.4g}\n")
        for note in run.notes:
            text.append(f"note: {note}\n", style="yellow")
        text.append("\nmark two runs (space) to compare their settings", style="dim")
        return text

    # ------------------------------------------------------------ actions on the run under the cursor

    def action_resume(self) -> None:
        run = self.current_run()
        if run is None:
            return
        if not run.resumable:
            why = {"running": "it is training now", "finished": "it finished"}.get(run.status, "it has no checkpoint")
            self.notify(f"{run.name} cannot be resumed: {why}", severity="warning")
            return
        if self.app.training:
            self.notify("A run is training: stop it first (F3)", severity="warning")
            return
        cfg, problems = run_settings(run)
        question = (f"Resume {run.name} ({run.status}) from its checkpoint at step {run.last_checkpoint}, with its "
                    f"own settings, on the Train screen?")
        if problems:
            question += f" Its settings have problems, defaults used for: {'; '.join(problems[:2])}"

        async def answer(yes: bool | None) -> None:
            if yes:
                await self.app.switch_mode("train")
                self.app.get_screen("train").resume_run(str(run.path), cfg)
        self.app.push_screen(ConfirmScreen(question, yes=f"Resume from step {run.last_checkpoint}"), answer)

    def action_delete(self) -> None:
        run = self.current_run()
        if run is None:
            return
        if run.status == "running":
            self.notify(f"{run.name} is training: stop it before deleting it", severity="error")
            return

        def answer(yes: bool | None) -> None:
            if not yes:
                return
            try:
                delete_run(run.path)
            except RunIndexError as exc:
                self.notify(str(exc), title="Not deleted", severity="error", timeout=10)
            else:
                self.notify(f"Deleted {run.path}")
            self.scan()
        self.app.push_screen(ConfirmScreen(f"Delete {run.name}? Its checkpoints, adapter and logs ({run.path}) are "
                                           "removed for good.", yes="Delete", no="Keep"), answer)

    async def action_chat(self) -> None:
        run = self.current_run()
        if run is None:
            return
        if run.adapter is None:
            self.notify(f"{run.name} has no adapter or checkpoint to chat with", severity="warning")
            return
        await self.app.switch_mode("chat")
        self.app.get_screen("chat").select_adapter(str(run.adapter))
