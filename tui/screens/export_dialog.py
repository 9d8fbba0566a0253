"""The Export dialog (ctrl+g on the Chat screen): the chosen adapter (or the base) out as GGUF, an Ollama folder,
a PEFT adapter or a fused MLX model, with a progress bar and, when done, the result's path and size. The
export runs on the engine thread; the Chat screen, which owns the engine's export messages, hands them to
this dialog (`show_progress`, `show_done`, `show_error`)."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ProgressBar, Select, Static

from engine.export.formats import DEFAULT_QUANT, FORMATS
from engine.export.gguf import QUANTS
from engine.protocol import ExportDone, ExportModel

FORMAT_LABELS = {"gguf": "GGUF file (llama.cpp, LM Studio)", "ollama": "Ollama folder (GGUF + Modelfile)",
                 "peft": "PEFT adapter (transformers, vLLM)", "mlx": "fused MLX model (mlx-lm)"}


def default_out(output_dir: str, adapter: str | None, to: str, quant: str) -> str:
    """exports/<run>-<format>[-<quant>][.gguf] under the runs folder: a new name per choice."""
    if adapter:
        a = Path(adapter)
        run = a.parent.name if a.name == "adapter" else f"{a.parents[1].name}-{a.name}" if a.parent.name == \
            "checkpoints" else a.name
    else:
        run = "base"
    name = f"{run}-{to}" + (f"-{quant}" if to in DEFAULT_QUANT else "") + (".gguf" if to == "gguf" else "")
    return str(Path(output_dir) / "exports" / name)


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class ExportDialog(ModalScreen[None]):
    DEFAULT_CSS = """
    ExportDialog { align: center middle; }
    ExportDialog > Vertical { width: 90%; max-width: 100; height: auto; padding: 1 2; border: thick $primary;
                              background: $surface; }
    ExportDialog Horizontal { height: auto; }
    ExportDialog Select { width: 1fr; }
    ExportDialog #export-quant { width: 16; }
    ExportDialog #export-status { height: auto; margin: 1 0 0 0; }
    ExportDialog Button { margin: 1 1 0 0; }
    """
    BINDINGS = [("escape", "dismiss(None)", "Close")]

    def __init__(self, adapter: str | None) -> None:
        super().__init__()
        self.adapter = adapter
        self.running = False
        self.typed_out = False  # the user edited the path: keep it when the format changes

    def compose(self) -> ComposeResult:
        cfg = self.app.cfg
        what = f"adapter {self.adapter} on base {cfg.model.name}" if self.adapter else \
            f"the base model {cfg.model.name} (no adapter chosen)"
        with Vertical():
            yield Label(f"[b]Export[/b] {escape(what)}")
            with Horizontal():
                yield Select([(FORMAT_LABELS[f], f) for f in FORMATS], value="gguf", allow_blank=False,
                             id="export-format")
                yield Select([(q, q) for q in QUANTS], value=DEFAULT_QUANT["gguf"], allow_blank=False,
                             id="export-quant")
            yield Input(default_out(cfg.output.dir, self.adapter, "gguf", DEFAULT_QUANT["gguf"]), id="export-out")
            yield ProgressBar(total=1.0, show_eta=False, id="export-progress")
            yield Static("", id="export-status")
            with Horizontal():
                yield Button("Export", variant="primary", id="export-start")
                yield Button("Close", id="export-close")

    @on(Select.Changed)
    def choice_changed(self) -> None:
        to = self.query_one("#export-format", Select).value
        quant = self.query_one("#export-quant", Select)
        quant.disabled = to not in DEFAULT_QUANT
        if not self.typed_out:
            out = self.query_one("#export-out", Input)
            out.value = default_out(self.app.cfg.output.dir, self.adapter, to, str(quant.value))

    @on(Input.Changed, "#export-out")
    def out_edited(self, event: Input.Changed) -> None:
        to = self.query_one("#export-format", Select).value
        quant = str(self.query_one("#export-quant", Select).value)
        self.typed_out = event.value != default_out(self.app.cfg.output.dir, self.adapter, to, quant)

    @on(Button.Pressed, "#export-close")
    def close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#export-start")
    @on(Input.Submitted, "#export-out")
    def start(self) -> None:
        if self.running:
            return
        if self.app.training:
            self.set_status("[$warning]The engine is training: export after the run (or stop it)[/]")
            return
        to = str(self.query_one("#export-format", Select).value)
        quant = str(self.query_one("#export-quant", Select).value) if to in DEFAULT_QUANT else None
        out = self.query_one("#export-out", Input).value.strip()
        if not out:
            self.set_status("[$warning]Name where the export goes[/]")
            return
        self.running = True
        self.query_one("#export-start", Button).disabled = True
        self.query_one("#export-progress", ProgressBar).update(progress=0)
        self.set_status(f"Exporting to {escape(out)}…")
        self.app.submit(ExportModel(self.app.cfg, to, out, self.adapter, quant))

    def set_status(self, text: str) -> None:
        self.query_one("#export-status", Static).update(text)

    def show_progress(self, what: str, fraction: float) -> None:
        self.query_one("#export-progress", ProgressBar).update(progress=fraction)
        self.set_status(f"Exporting: {escape(what)}")

    def show_done(self, done: ExportDone) -> None:
        self.running = False
        self.query_one("#export-start", Button).disabled = False
        self.query_one("#export-progress", ProgressBar).update(progress=1.0)
        self.set_status(f"[$success]Wrote {done.format}:[/] {escape(done.path)} ({human_size(done.bytes)}, "
                        f"{done.seconds:.1f} s)")

    def show_error(self, message: str) -> None:
        self.running = False
        self.query_one("#export-start", Button).disabled = False
        self.set_status(f"[$error]{escape(message)}[/]")
