"""The Train screen's panels, each painting the run events it cares about (the screen forwards them)."""

from tui.widgets.train.checkpoint_table import CheckpointTable
from tui.widgets.train.event_log import EventLog
from tui.widgets.train.loss_chart import LossChart
from tui.widgets.train.memory_gauges import MemoryGauges
from tui.widgets.train.rewards_panel import RewardsPanel
from tui.widgets.train.run_stats import RunStats

__all__ = ["CheckpointTable", "EventLog", "LossChart", "MemoryGauges", "RewardsPanel", "RunStats"]
