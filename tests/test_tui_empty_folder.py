"""The app started in an empty folder: it opens on the built-in defaults, offers to write config.yaml, ctrl+s
writes it there, and the Dataset screen says how to get the sample data."""

from __future__ import annotations

from textual.widgets import Static

from engine.config.loading import to_yaml
from engine.config.schema import Config
from tui.app import LoraTuiApp
from tui_helpers import notifications_shown, wait_for

SIZE = (120, 40)


async def test_empty_folder_opens_on_defaults_and_ctrl_s_writes_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = LoraTuiApp()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        assert app.config_path is None and app.sub_title == "built-in defaults"
        offer = [n for n in notifications_shown(app) if "No config.yaml here" in n]
        assert offer and "ctrl+s" in offer[0] and "./config.yaml" in offer[0] and "lora-tui init" in offer[0]
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: (tmp_path / "config.yaml").is_file(), timeout=10, what="config.yaml")
        assert (tmp_path / "config.yaml").read_text() == to_yaml(Config())
        assert app.config_path == "config.yaml" and app.sub_title == "config.yaml" and not app.dirty
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no data/: that is `lora-tui init`
        notes = notifications_shown(app)
        assert any("Saved config.yaml" in n for n in notes) and not any("No config.yaml here" in n for n in notes)


async def test_the_offer_goes_when_the_user_leaves_the_config_screen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = LoraTuiApp()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        assert any("No config.yaml here" in n for n in notifications_shown(app))
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.current_mode == "runs", timeout=30, what="the runs screen")
        await pilot.pause()
        assert not any("No config.yaml here" in n for n in notifications_shown(app))
        assert not (tmp_path / "config.yaml").exists()


async def test_save_never_replaces_a_config_that_appeared_meanwhile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = LoraTuiApp()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        (tmp_path / "config.yaml").write_text("lora:\n  rank: 4\n")  # e.g. `lora-tui init` in another terminal
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert (tmp_path / "config.yaml").read_text() == "lora:\n  rank: 4\n"
        assert any("appeared here since the app started" in n for n in notifications_shown(app))


async def test_dataset_screen_says_run_init_without_the_sample_data(tmp_path, monkeypatch, embedded_dir):
    monkeypatch.chdir(tmp_path)
    app = LoraTuiApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen.query("#dataset-summary"), timeout=30, what="the dataset screen")
        await pilot.press("ctrl+v")
        summary = app.screen.query_one("#dataset-summary", Static)
        await wait_for(pilot, lambda: "no such file" in str(summary.render()), timeout=60, what="the error")
        assert str(summary.render()).strip() == ("data/tool_calls.jsonl: no such file: run `lora-tui init` to "
                                                  "write the sample data here")
