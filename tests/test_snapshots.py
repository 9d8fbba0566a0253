"""SVG snapshots of each screen at 120x40 (pytest-textual-snapshot). Update with --snapshot-update."""

from pathlib import Path

import pytest

from tui.app import LoraTuiApp
from tui_helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
SIZE = (120, 40)


@pytest.fixture()
def make_app(monkeypatch, tmp_path, embedded_dir):
    monkeypatch.chdir(ROOT)

    def make():
        app = LoraTuiApp("config.yaml")
        app.cfg.output.dir = str(tmp_path / "no-runs-yet")  # the chat screen lists no adapters
        return app
    return make


def test_config_screen(snap_compare, make_app):
    assert snap_compare(make_app(), terminal_size=SIZE)


def test_dataset_screen_after_validation(snap_compare, make_app):
    async def validate(pilot):
        await pilot.press("f2")
        await pilot.pause()
        pilot.app.screen.query_one("#dataset-path").value = "tests/fixtures/malformed.jsonl"
        await pilot.click("#validate")
        table = pilot.app.screen.query_one("#dataset-errors")
        await wait_for(pilot, lambda: table.row_count == 25)
        await pilot.pause()
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=validate)


def test_train_screen_idle(snap_compare, make_app):
    assert snap_compare(make_app(), terminal_size=SIZE, press=["f3"])


def test_chat_screen_idle(snap_compare, make_app):
    assert snap_compare(make_app(), terminal_size=SIZE, press=["f4"])


def test_config_screen_at_80x24(snap_compare, make_app):
    assert snap_compare(make_app(), terminal_size=(80, 24))
