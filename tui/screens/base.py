"""What every lora-tui screen shares."""

from __future__ import annotations

from textual import events
from textual.screen import Screen


class AppScreen(Screen):
    def on_screen_resume(self, event: events.ScreenResume) -> None:
        # Textual re-applies the whole stylesheet to every widget of a screen each time it is resumed.
        # App.switch_mode already refreshes the CSS of a screen that missed a stylesheet or theme change,
        # so that second pass only costs time (about 200 ms for the config form on 2 cores under load).
        # This handler runs before Screen's own (subclass first in the MRO) and turns the pass off.
        event.refresh_styles = False
