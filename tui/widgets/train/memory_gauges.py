"""System RAM, this process, MLX active and MLX peak memory, each as a gauge of the machine's RAM."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical

from engine.protocol import MemoryStats
from tui.widgets.gauge import Gauge


class MemoryGauges(Vertical):
    DEFAULT_CSS = "MemoryGauges { height: auto; }"

    def compose(self) -> ComposeResult:
        yield Gauge("system RAM", id="g-ram")
        yield Gauge("process", id="g-rss")
        yield Gauge("MLX active", id="g-active")
        yield Gauge("MLX peak", id="g-peak")

    def show(self, m: MemoryStats) -> None:
        total = m.system_total_bytes
        self.query_one("#g-ram", Gauge).set(m.system_used_bytes, total)
        self.query_one("#g-rss", Gauge).set(m.rss_bytes, total)
        self.query_one("#g-active", Gauge).set(m.mlx_active_bytes, total)
        self.query_one("#g-peak", Gauge).set(m.mlx_peak_bytes, total)
