"""Review screen (scaffold: filled in by issue 20's work)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Header, Static

from tui.screens.base import AppScreen
from tui.widgets.footer import KeyFooter


class ReviewScreen(AppScreen):
    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="review-body")
        yield KeyFooter()
