"""A labelled bar with numbers, e.g. `RAM ███████░░░░ 5.1 / 24.0 GB`."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class Gauge(Static):
    DEFAULT_CSS = "Gauge { height: 1; }"

    def __init__(self, label: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label = label
        self.value, self.total = 0.0, 0.0

    def set(self, value: float, total: float) -> None:
        self.value, self.total = value, total
        self.refresh()

    def render(self) -> Text:
        width = max(self.size.width - 34, 8)
        frac = min(self.value / self.total, 1.0) if self.total else 0.0
        filled = int(round(frac * width))
        style = "green" if frac < 0.7 else "yellow" if frac < 0.9 else "red"
        text = Text(f"{self.label:<11}")
        text.append("█" * filled, style=style)
        text.append("░" * (width - filled), style="grey37")
        text.append(f" {self.value / 1e9:6.2f} / {self.total / 1e9:.1f} GB" if self.total else "   –")
        return text
