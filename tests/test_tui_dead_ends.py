"""The TUI's dead ends (issue 15), each through the real app with Textual's pilot, the real engine thread
and the embedded model: the config form saves only what the user typed, big inputs stay bounded and
stoppable, errors end what they interrupt, quitting is prompt, and an interrupted run can be resumed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from textual.widgets import Input, Static

from tui.app import LoraTuiApp
from tui_helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
SIZE = (120, 40)


@pytest.fixture()
def app_in(tmp_path, monkeypatch):
    """An app whose config file is a copy of config.yaml in a temp folder."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    monkeypatch.chdir(ROOT)
    return lambda: LoraTuiApp(str(tmp_path / "config.yaml"))


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


async def type_into(pilot, field: str, text: str) -> None:
    """Find a setting with the search box (which selects its text), then type over it as a user does."""
    app = pilot.app
    search = app.screen.query_one("#field-search", Input)
    search.focus()
    search.value = ""
    await pilot.press(*field, "enter")
    await wait_for(pilot, lambda: app.screen.focused is not None and app.screen.focused.id != "field-search",
                   timeout=10, what=f"{field} to get focus")
    await pilot.press(*text)
    await pilot.pause()


# ---------------------------------------------------------------- the config form saves what was typed

@pytest.mark.parametrize("typed", ["99999", "1e3"])
async def test_save_refuses_a_field_whose_text_is_no_valid_value(app_in, tmp_path, embedded_dir, typed):
    """Each keystroke of 99999 was valid up to 999 and 1e3 up to 1: the form used to save those."""
    app = app_in()
    before = (tmp_path / "config.yaml").read_text()
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "rank", typed)
        assert app.screen.query_one("#f-lora--rank", Input).value == typed
        await type_into(pilot, "alpha", "64")  # a valid edit elsewhere must not hide the rank problem
        assert "✗" in str(app.screen.query_one("#f-lora--rank-msg", Static).render())
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert (tmp_path / "config.yaml").read_text() == before
        refusal = [m for m in notes(app) if m.startswith("Not saved")]
        assert refusal and "lora.rank" in refusal[-1], notes(app)
        assert "error(s)" in str(app.screen.query_one("#config-status", Static).render())
        # fixed: saved as typed
        await type_into(pilot, "rank", "8")
        await pilot.press("ctrl+s")
        await pilot.pause()
        saved = (tmp_path / "config.yaml").read_text()
        assert "  rank: 8\n" in saved and "  alpha: 64.0\n" in saved and not app.dirty


async def test_save_writes_no_environment_override(app_in, tmp_path, embedded_dir, monkeypatch):
    monkeypatch.setenv("LORA_TUI__TRAINING__LEARNING_RATE", "0.0003")
    monkeypatch.setenv("LORA_TUI__LORA__DROPOUT", "0.2")
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        assert app.cfg.training.learning_rate == 0.0003  # the session runs with the override...
        assert app.screen.query_one("#f-training--learning_rate", Input).value == "0.0003"
        assert "LORA_TUI__TRAINING__LEARNING_RATE" in str(
            app.screen.query_one("#f-training--learning_rate-msg", Static).render())
        await type_into(pilot, "rank", "8")
        await type_into(pilot, "dropout", "0.1")  # ...and a field the user edits is theirs to save
        await pilot.press("ctrl+s")
        await pilot.pause()
    saved = (tmp_path / "config.yaml").read_text()
    assert "  rank: 8\n" in saved and "  dropout: 0.1\n" in saved
    assert "  learning_rate: 0.0001\n" in saved  # the file's own value, not the override
    assert "0.0003" not in saved
