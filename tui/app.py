"""lora-tui's Textual app. First cut: the effective config, the model import and a dataset check,
driven by the real engine on a worker thread. Forms, live training and chat arrive with issue #4."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static

from tui.messages import DatasetValidated, EngineFailed, EngineProgress


class LoraTuiApp(App[int]):
    TITLE = "lora-tui"
    CSS_PATH = "app.tcss"
    BINDINGS = [("v", "validate", "Validate dataset"), ("q", "quit", "Quit")]

    def __init__(self, config_path: str | None = None) -> None:
        super().__init__()
        if config_path is None and Path("config.yaml").is_file():
            config_path = "config.yaml"
        self.config_path = config_path
        self.cfg = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="body"):
            yield Static(id="config")
            yield ProgressBar(total=1.0, show_eta=False, id="progress")
            yield Static("", id="status")
            yield DataTable(id="issues", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        from engine.config import ConfigError, load_config
        self.sub_title = self.config_path or "built-in defaults"
        table = self.query_one("#issues", DataTable)
        table.add_columns("line", "field", "problem")
        try:
            self.cfg, issues = load_config(self.config_path)
        except ConfigError as exc:
            self.query_one("#config", Static).update("Config has errors:\n" + "\n".join(
                f"  {i.field}: {i.message}" for i in exc.issues if i.severity == "error"))
            self.notify(str(exc), severity="error", timeout=10)
            return
        for issue in issues:
            self.notify(f"{issue.field}: {issue.message}", severity="warning")
        c = self.cfg
        self.query_one("#config", Static).update(
            f"[b]model[/b] {c.model.name}  [b]max_seq_length[/b] {c.model.max_seq_length}\n"
            f"[b]LoRA[/b] rank {c.lora.rank}, alpha {c.lora.alpha:g} on {', '.join(c.lora.target_modules)}"
            f"{'  (DoRA)' if c.lora.use_dora else ''}\n"
            f"[b]training[/b] lr {c.training.learning_rate:g}, batch {c.training.batch_size} x "
            f"{c.training.grad_accumulation}, {c.training.epochs} epoch(s)\n"
            f"[b]data[/b] {c.data.path} (train labels: {', '.join(c.data.train_labels) or 'all'})")
        self.action_validate()

    def action_validate(self) -> None:
        if self.cfg is not None:
            self.query_one("#status", Static).update("Preparing the model and checking the dataset…")
            self.validate_dataset()

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False)
    def validate_dataset(self) -> None:
        from engine.data import DatasetError, validate_dataset
        from engine.model import ModelLoadError, load_tokenizer
        cfg = self.cfg
        try:
            tokenizer = load_tokenizer(cfg.model, lambda w, f: self.post_message(EngineProgress(w, f * 0.3)))
            report, _ = validate_dataset(
                cfg.data.path, tokenizer, max_seq_length=cfg.model.max_seq_length,
                error_threshold=cfg.data.error_threshold, train_labels=cfg.data.train_labels,
                mask_prompt=cfg.data.mask_prompt,
                progress=lambda d, t: self.post_message(EngineProgress("validating", 0.3 + 0.7 * d / t)))
        except (DatasetError, ModelLoadError) as exc:
            self.post_message(EngineFailed(str(exc)))
            return
        self.post_message(DatasetValidated(report))

    def on_engine_progress(self, msg: EngineProgress) -> None:
        self.query_one("#progress", ProgressBar).update(progress=msg.fraction)
        self.query_one("#status", Static).update(msg.what)

    def on_dataset_validated(self, msg: DatasetValidated) -> None:
        report = msg.report
        self.query_one("#progress", ProgressBar).update(progress=1.0)
        verdict = "[red]rejected[/red]" if report.failed else "[green]ok[/green]"
        self.query_one("#status", Static).update(f"Dataset {verdict}: {report.summary()}")
        table = self.query_one("#issues", DataTable)
        table.clear()
        for issue in report.issues[:500]:
            table.add_row(str(issue.line), issue.field, issue.reason)

    def on_engine_failed(self, msg: EngineFailed) -> None:
        self.query_one("#status", Static).update(f"[red]{msg.message}[/red]")
        self.notify(msg.message, severity="error", timeout=10)
