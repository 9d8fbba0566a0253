"""Dataset screen: validate a dataset (any container engine.data.sources reads, or a weighted mix) on the
engine thread, then show what a user needs to know: the container, row shapes and column map read, counts,
labels, token lengths and truncation, every bad row (with a preview), and one conversation rendered through
the chat template with trained and masked tokens told apart."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape

from tui.screens.base import AppScreen
from tui.widgets.footer import KeyFooter
from textual.widgets import Button, DataTable, Header, Input, ProgressBar, Sparkline, Static

from engine.config.schema import SPECS
from engine.data import method_use
from engine.data.sources import record_text
from engine.protocol import ConversationPreview, ValidateDataset
from tui import messages as msg
from tui.screens.config_screen import as_text

if TYPE_CHECKING:
    from engine.config.schema import Config
    from engine.data.validate import DatasetReport


def method_lines(report: DatasetReport, cfg: Config) -> str:
    """What each training method would train on, the configured method's line first and marked, the others
    dimmer (DPO and ORPO share a line)."""
    uses = method_use(report, cfg.data.train_labels)
    first = uses.get(cfg.training.method)
    lines = [f"[b]▶ {escape(first)}[/b] [dim]← training.method[/dim]"] if first else []
    for line in dict.fromkeys(uses.values()):
        if line != first:
            lines.append(f"[dim]  {escape(line)}[/dim]")
    return "\n".join(lines)


class DatasetScreen(AppScreen):
    AUTO_FOCUS = "#validate"
    BINDINGS = [Binding("ctrl+v", "validate", "Validate")]
    methods_for: DatasetReport | None = None  # the report the method lines describe, None while validating
    shown_issues: list = []  # the issues in the table, in its row order

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="toolbar"):
            yield Input(as_text(SPECS["data.path"], self.app.cfg.data.path), id="dataset-path",
                        placeholder="a file (JSONL, JSON, CSV, Parquet, Arrow), a folder or a hub id; "
                                    "a mix: a.jsonl*0.7, b.csv*0.3")
            yield Button("Validate", id="validate", variant="primary")
        yield ProgressBar(total=1.0, show_eta=False, id="dataset-progress")
        with Horizontal(id="dataset-body"):
            with Vertical(id="dataset-left"):
                yield Static("Choose a dataset and press Validate (ctrl+v).", id="dataset-summary")
                yield Static("", id="dataset-methods")
                yield Static("", id="histogram-label", classes="muted")
                yield Sparkline([], id="histogram")
                errors = DataTable(id="dataset-errors", zebra_stripes=True, cursor_type="row")
                # Columns here, not in on_mount: a screen prebuilt in the background (tui/app.py) could get
                # its Mount before this table was composed, and the lookup failed (a rare CI flake).
                errors.add_columns("where", "field", "problem")
                yield errors
                yield Static("", id="line-preview", classes="muted")
            with VerticalScroll(id="dataset-right"):
                yield Static("", id="rendered")
        yield KeyFooter()

    @on(Button.Pressed, "#validate")
    @on(Input.Submitted, "#dataset-path")
    def action_validate(self) -> None:
        path = self.query_one("#dataset-path", Input).value.strip()
        if not path:
            self.notify("Enter a dataset path first", severity="warning")
            return
        if self.app.training:
            self.notify("The engine is training; validate after the run (or stop it)", severity="warning")
            return
        self.query_one("#dataset-summary", Static).update(f"Validating {escape(path)}…")
        self.show_methods(None)
        self.query_one("#dataset-progress", ProgressBar).update(progress=0)
        self.app.submit(ValidateDataset(self.app.cfg, path))

    @on(msg.ValidationProgress)
    def show_progress(self, message: msg.ValidationProgress) -> None:
        self.query_one("#dataset-progress", ProgressBar).update(progress=message.result.fraction)

    @on(msg.DatasetValidated)
    def show_result(self, message: msg.DatasetValidated) -> None:
        self.show_report(message.result.report, message.result.preview)

    @on(msg.EngineFailed)
    def show_error(self, message: msg.EngineFailed) -> None:
        self.query_one("#dataset-summary", Static).update(f"[$error]{escape(message.result.message)}[/]")
        self.show_methods(None)

    def show_report(self, report: DatasetReport, preview: ConversationPreview | None) -> None:
        self.report = report
        self.query_one("#dataset-progress", ProgressBar).update(progress=1.0)
        verdict = "[$error]rejected[/]" if report.failed else "[$success]ok[/]"
        labels = ", ".join(f"{k} {v}" for k, v in sorted(report.labels.items())) or "none"
        lines = [f"[b]{escape(report.path)}[/b]: {verdict}"]
        lines += [f"[dim]{escape(line)}[/dim]" for line in report.shape_lines()]
        lines += [f"{report.valid} valid of {report.records} conversations; {report.error_lines} bad {report.unit}s "
                  f"({report.error_rate:.1%}, threshold {report.error_threshold:.0%})",
                 f"labels: {escape(labels)}; will train on {report.trainable}"
                 + (f", set aside {sum(report.set_aside.values())} ({escape(', '.join(report.set_aside))})"
                    if report.set_aside else "")]
        p = report.length_percentiles()
        if p:
            lines.append(f"tokens: p50 {p['p50']}, p95 {p['p95']}, max {p['max']}; "
                         f"{report.truncated} longer than max_seq_length={report.max_seq_length} will be truncated")
        for w in report.warnings:
            lines.append(f"[$warning]! {escape(w)}[/]")
        self.query_one("#dataset-summary", Static).update("\n".join(lines))
        self.show_methods(report)
        counts, edges = report.histogram(30)
        self.query_one("#histogram", Sparkline).data = counts
        self.query_one("#histogram-label", Static).update(
            f"token lengths {edges[0]}…{edges[-1]} (max_seq_length {report.max_seq_length})" if edges else "")
        table = self.query_one("#dataset-errors", DataTable)
        table.clear()
        self.shown_issues = report.issues[:1000]
        for issue in self.shown_issues:
            where = f"{issue.source + ' ' if issue.source else ''}{issue.unit} {issue.line}"
            table.add_row(where, issue.field or "—",
                          issue.reason + ("" if issue.severity == "error" else " (warning)"), key=str(len(table.rows)))
        self.query_one("#line-preview", Static).update("")
        self.show_rendered(preview)

    def show_methods(self, report: DatasetReport | None) -> None:
        self.methods_for = report
        self.query_one("#dataset-methods", Static).update(method_lines(report, self.app.cfg) if report else "")

    @on(events.ScreenResume)
    def methods_after_config_edits(self) -> None:
        """training.method or data.train_labels may have been changed on the Config screen since."""
        if self.methods_for is not None:
            self.show_methods(self.methods_for)

    def show_rendered(self, preview: ConversationPreview | None) -> None:
        widget = self.query_one("#rendered", Static)
        if not preview:
            widget.update("")
            return
        out = [f"[b]{preview.unit} {preview.line} through the chat template[/b] — [reverse $success]trained[/] / [dim]masked[/dim]\n"]
        for piece, trained in preview.pieces:
            text = escape(piece)
            out.append(f"[reverse $success]{text}[/]" if trained else f"[dim]{text}[/dim]")
        widget.update("".join(out))

    @on(DataTable.RowHighlighted, "#dataset-errors")
    def preview_line(self, event: DataTable.RowHighlighted) -> None:
        issue = self.shown_issues[event.cursor_row]
        text = record_text(issue.source or self.report.path, issue.unit, issue.line)
        self.query_one("#line-preview", Static).update(f"{issue.unit} {issue.line}: {escape(text)}")
