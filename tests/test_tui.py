"""Pilot tests of every screen's main flow, driving the real engine thread and the embedded model."""

from pathlib import Path

from textual.widgets import DataTable, Input, Select, Sparkline, Static, Switch

from engine.config.schema import SPECS
from tui.app import LoraTuiApp
from tui.screens.confirm import ConfirmScreen
from helpers import ROOT, lora_tui_cmd, tiny_config, tiny_yaml
from tui_helpers import answering, train_state, wait_for
SIZE = (120, 40)


async def test_config_form_shows_errors_beside_fields_and_saves(app_in, tmp_path, embedded_dir):
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        rank = app.screen.query_one("#f-lora--rank", Input)
        rank.value = "0"
        await pilot.pause()
        msg = str(app.screen.query_one("#f-lora--rank-msg", Static).render())
        assert "0 is out of range (valid: 1 <= x <= 1024)" in msg
        assert app.dirty
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "rank: 16" in (tmp_path / "config.yaml").read_text()  # refused: invalid
        rank.value = "8"
        app.screen.query_one("#f-training--lr_schedule", Select).value = "linear"
        await pilot.pause()
        assert "out of range" not in str(app.screen.query_one("#f-lora--rank-msg", Static).render())
        await pilot.press("ctrl+s")
        await pilot.pause()
        saved = (tmp_path / "config.yaml").read_text()
        assert "  rank: 8\n" in saved and "lr_schedule: linear" in saved and not app.dirty


async def test_find_a_setting_in_another_tab_right_after_start(app_in, embedded_dir):
    """Searching jumps to the field's tab and focuses it."""
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"grad_accumulation", "enter")
        await wait_for(pilot, lambda: app.screen.focused is not None and app.screen.focused.id != "field-search",
                       timeout=10, what="the field to get focus")
        focused = app.screen.focused
        assert focused is not None and focused.id == "f-training--grad_accumulation"
        assert app.screen.query_one("#form").active == "tab-training"
        assert len(app.screen.query(".help")) == len(SPECS)  # every field built exactly once


async def test_switching_screens_right_after_start(app_in, embedded_dir):
    """Screen switches pressed right after the first frame (building config tabs after it froze the app)."""
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        for key in ("f3", "f1", "f2", "f1"):
            await pilot.press(key)
        await wait_for(pilot, lambda: app.current_mode == "config", timeout=30, what="the config screen")
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.query("#start"), timeout=10, what="the train screen")


async def test_cross_field_warning_and_unsaved_guard(app_in, embedded_dir):
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#f-training--learning_rate", Input).value = "0.5"
        await pilot.pause()
        assert "high for LoRA" in str(app.screen.query_one("#f-training--learning_rate-msg", Static).render())
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert app.is_running and not isinstance(app.screen, ConfirmScreen)


async def test_dataset_screen_lists_bad_lines_and_renders_masking(app_in, embedded_dir):
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("#dataset-path", Input).value = "tests/fixtures/malformed.jsonl"
        await pilot.click("#validate")
        table = app.screen.query_one("#dataset-errors", DataTable)
        await wait_for(pilot, lambda: table.row_count > 0, what="the validation report")
        assert table.row_count == 25
        summary = str(app.screen.query_one("#dataset-summary", Static).render())
        assert "rejected" in summary and "25 bad lines" in summary
        assert "trained" in str(app.screen.query_one("#rendered", Static).render())
        table.focus()
        await pilot.press("down")
        await pilot.pause()
        assert "line 3: [1, 2, 3]" in str(app.screen.query_one("#line-preview", Static).render())
        # the sample dataset: clean, with a length histogram
        app.screen.query_one("#dataset-path", Input).value = "data/tool_calls.jsonl"
        await pilot.click("#validate")
        await wait_for(pilot, lambda: "1440 valid" in str(app.screen.query_one("#dataset-summary", Static).render()))
        assert sum(app.screen.query_one("#histogram", Sparkline).data) == 1440


async def test_train_then_chat_with_the_adapter(tmp_path, embedded_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    app.cfg = tiny_config(tmp_path, output={"run_name": "tui"})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        await pilot.click("#start")
        screen = app.screen
        await wait_for(pilot, lambda: train_state(screen) == "done", timeout=180, what="training to finish")
        assert len(screen.query_one("#loss-chart", Sparkline).data) == 4
        rows = [screen.query_one("#checkpoints", DataTable).get_row_at(i)
                for i in range(screen.query_one("#checkpoints", DataTable).row_count)]
        assert any("best" in r[3] for r in rows)
        assert "step 4 / 4" in str(screen.query_one("#train-stats", Static).render())
        # chat: the new adapter is offered and answers, side by side with the base
        await pilot.press("f4")
        await pilot.pause()
        chat = app.screen
        model = chat.query_one("#chat-model", Select)
        assert str(model.value).endswith("tui/adapter")
        chat.query_one("#chat-sbs", Switch).value = True
        chat.query_one("#chat-max", Input).value = "6"
        chat.query_one("#chat-input", Input).value = "2+2"
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.query("Bubble.assistant") and not answering(chat), what="answers")
        answers = [b.text for b in chat.query("Bubble.assistant")]
        assert len(answers) == 2 and all(a.strip() for a in answers)


async def test_ctrl_s_saves_a_checkpoint_now(tmp_path, embedded_dir, monkeypatch):
    """ctrl+s on the Train screen: a checkpoint at the next step, listed with reason "manual"."""
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    app.cfg = tiny_config(tmp_path, training={"iterations": 500}, output={"run_name": "tui"})
    app.cfg.checkpoints.every_steps = app.cfg.evaluation.every_steps = 0  # no checkpoint but the one asked for
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        await pilot.click("#start")
        screen = app.screen
        await wait_for(pilot, lambda: train_state(screen) == "running" and screen.query_one("#loss-chart").data,
                       what="steps")
        assert any("Save checkpoint" in str(key.render()) for key in screen.query("FooterKey"))  # the key is shown
        await pilot.press("ctrl+s")
        table = screen.query_one("#checkpoints", DataTable)
        await wait_for(pilot, lambda: any(table.get_row_at(i)[1] == "manual" for i in range(table.row_count)),
                       what="the manual checkpoint")
        step = int(next(table.get_row_at(i)[0] for i in range(table.row_count) if table.get_row_at(i)[1] == "manual"))
        assert (tmp_path / "runs" / "tui" / "checkpoints" / f"step_{step:06d}" / "adapters.safetensors").is_file()
        await pilot.click("#stop")
        await wait_for(pilot, lambda: train_state(screen) == "done", timeout=120, what="the stop")


async def test_quit_during_training_saves_and_exits_0(tmp_path, embedded_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    app.cfg = tiny_config(tmp_path, training={"iterations": 500}, output={"run_name": "tui"})
    app.cfg.checkpoints.every_steps = app.cfg.evaluation.every_steps = 0  # only the stop saves
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        await pilot.click("#start")
        await wait_for(pilot, lambda: train_state(app.screen) == "running" and app.screen.query_one("#loss-chart").data,
                       what="steps")
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.is_running, timeout=120, what="exit")
    assert app.return_code == 0
    import json
    newest = sorted((tmp_path / "runs" / "tui" / "checkpoints").glob("step_*"))[-1]
    assert json.loads((newest / "trainer_state.json").read_text())["reason"] == "stop"
    assert (newest / "adapters.safetensors").is_file()


async def test_bad_config_file_shows_errors_not_a_crash(tmp_path, embedded_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 0\ntraining:\n  lerning_rate: 1\n")
    app = LoraTuiApp(str(bad))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        assert "1 <= x <= 1024" in str(app.screen.query_one("#f-lora--rank-msg", Static).render())
        from tui_helpers import notifications_shown
        notes = notifications_shown(app)
        assert any("did you mean 'training.learning_rate'" in m for m in notes)


async def test_follow_a_run_started_headless(tmp_path, embedded_dir, monkeypatch):
    """A run started elsewhere (here `lora-tui train` in another process) shown live on the Train screen
    from its metrics.jsonl: the way a distributed run started with mlx.launch is followed."""
    import subprocess
    monkeypatch.chdir(ROOT)
    config = tiny_yaml(tmp_path, "c.yaml", training={"iterations": 6}, output={"run_name": "headless"})
    run_dir = tmp_path / "runs" / "headless"
    proc = subprocess.Popen(lora_tui_cmd("--config", config, "train"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        app = LoraTuiApp(None)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f3")
            await wait_for(pilot, lambda: (run_dir / "metrics.jsonl").is_file(), timeout=120, what="the run folder")
            screen = app.screen
            screen.query_one("#external", Input).value = str(run_dir)
            await pilot.press("ctrl+o")
            await wait_for(pilot, lambda: train_state(screen) == "following", timeout=10, what="following")
            await wait_for(pilot, lambda: train_state(screen) == "done", timeout=180, what="the followed run to end")
            assert "step 6 / 6" in str(screen.query_one("#train-stats", Static).render())
            assert len(screen.query_one("#loss-chart", Sparkline).data) == 6
            assert screen.query_one("#checkpoints", DataTable).row_count >= 1
            assert not app.training  # the app's own engine never trained
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0


async def test_launch_a_distributed_run_from_a_hosts_file(tmp_path, embedded_dir, monkeypatch):
    """Two ranks on this machine (an mlx.launch hosts file naming 127.0.0.1 twice runs them locally, no
    ssh), started from the Train screen and followed live until they finish."""
    import json
    monkeypatch.chdir(ROOT)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    app = LoraTuiApp(None)
    app.cfg = tiny_config(tmp_path, output={"run_name": "two-ranks"})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        screen = app.screen
        screen.query_one("#external", Input).value = str(hosts)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: train_state(screen) == "following", timeout=10, what="the launch")
        await wait_for(pilot, lambda: train_state(screen) == "done", timeout=240, what="the distributed run to end")
        stats = str(screen.query_one("#train-stats", Static).render())
        assert "step 4 / 4" in stats and "x 2 ranks" in stats, stats
        assert screen.external.process.wait(timeout=60) == 0
    report = json.loads((Path(app.cfg.output.dir) / "two-ranks" / "report.json").read_text())
    assert report["status"] == "finished" and report["step"] == 4
