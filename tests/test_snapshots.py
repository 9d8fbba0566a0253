"""SVG snapshots of each screen at 120x40 (pytest-textual-snapshot). Update with --snapshot-update."""

import pytest

from helpers import ROOT
from tui.app import LoraTuiApp
from tui_helpers import wait_for

SIZE = (120, 40)


@pytest.fixture()
def make_app(monkeypatch, tmp_path, embedded_dir):
    monkeypatch.chdir(ROOT)

    def make():
        app = LoraTuiApp("config.yaml")
        app.cfg.output.dir = str(tmp_path / "no-runs-yet")  # the chat screen lists no adapters
        return app
    return make


async def no_blink(pilot):
    """A blinking cursor makes a snapshot depend on timing: freeze it."""
    from textual.widgets import Input
    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False
    await pilot.pause()


def test_config_screen(snap_compare, make_app):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=no_blink)


def test_dataset_screen_after_validation(snap_compare, make_app):
    async def validate(pilot):
        await pilot.press("f2")
        await pilot.pause()
        pilot.app.screen.query_one("#dataset-path").value = "tests/fixtures/malformed.jsonl"
        await pilot.click("#validate")
        table = pilot.app.screen.query_one("#dataset-errors")
        await wait_for(pilot, lambda: table.row_count == 25)
        await no_blink(pilot)
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=validate)


def switch_to(key: str):
    async def run(pilot):
        await pilot.press(key)
        await pilot.pause()
        await no_blink(pilot)
    return run


def test_train_screen_idle(snap_compare, make_app):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=switch_to("f3"))


def test_chat_screen_idle(snap_compare, make_app):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=switch_to("f4"))


def test_config_screen_at_80x24(snap_compare, make_app):
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=no_blink)
