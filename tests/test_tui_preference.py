"""KTO/DPO/ORPO in the TUI: the config form's method fields, the Dataset screen's line per method (the configured
one marked), and the Train screen's rewards panel (hidden for SFT runs), fed as the engine feeds it."""

import json

import pytest
from textual.widgets import Input, Select, Sparkline

from engine import protocol as p
from tui.app import LoraTuiApp
from helpers import ROOT, addition_chats, tiny_config, write_jsonl
from tui_helpers import shown, train_state, wait_for

SIZE = (120, 40)
MEMORY = p.MemoryStats(1 << 30, 4 << 30, 16 << 30, 1 << 29, 1 << 30)


def labelled_app(tmp_path, **training) -> LoraTuiApp:
    """An app on a tiny config whose data is 30 desirable + 10 undesirable addition chats."""
    write_jsonl(tmp_path / "tiny.jsonl", addition_chats(40, undesirable_every=4))
    app = LoraTuiApp(None)
    app.cfg = tiny_config(tmp_path, training=training)
    return app


def step(n: int, preference: p.PreferenceStats | None = None) -> p.Step:
    return p.Step(n, 4, n / 4, 0.69, 1e-3, 0.5, 100.0, 1.0, 3.0, 64 * n, MEMORY, preference=preference)


def log_text(screen) -> str:
    return "\n".join(line.text for line in screen.query_one("#train-log").lines)


async def test_the_config_form_edits_the_method_fields(tmp_path, embedded_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    app = labelled_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        screen.query_one("#f-training--method", Select).value = "kto"
        screen.query_one("#f-training--beta", Input).value = "0.5"
        screen.query_one("#f-training--undesirable_weight", Input).value = "2"
        screen.query_one("#f-training--init_adapter", Input).value = "runs/sft/adapter"
        await pilot.pause()
        t = app.cfg.training
        assert (t.method, t.beta, t.undesirable_weight, t.init_adapter) == ("kto", 0.5, 2.0, "runs/sft/adapter")
        screen.query_one("#f-training--desirable_weight", Input).value = "0"  # must be > 0
        await pilot.pause()
        assert "out of range" in shown(screen, "#f-training--desirable_weight-msg")
        assert app.cfg.training.desirable_weight == 1.0


async def test_the_dataset_screen_marks_the_configured_methods_line(tmp_path, embedded_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    app = labelled_app(tmp_path, method="kto")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen.query("#validate"), timeout=10, what="the dataset screen")
        dataset = app.screen
        dataset.query_one("#dataset-path", Input).value = app.cfg.data.path
        await pilot.click("#validate")
        await wait_for(pilot, lambda: "▶" in shown(dataset, "#dataset-methods"), what="the validation report")
        lines = shown(dataset, "#dataset-methods").splitlines()
        assert lines[0].startswith("▶ KTO: 30 desirable + 10 undesirable")
        assert lines[1:] == ["  SFT: 30 answers, 10 set aside by data.train_labels",
                             "  DPO/ORPO: no pair rows (they need prompt + chosen / rejected)"]
        # another method chosen on the Config screen: the Dataset screen marks that one when shown again
        await pilot.press("f1")
        await pilot.pause()
        app.screen.query_one("#f-training--method", Select).value = "dpo"
        await pilot.pause()
        await pilot.press("f2")
        await wait_for(pilot, lambda: shown(dataset, "#dataset-methods").startswith("▶ DPO/ORPO"), timeout=10,
                       what="the marker to move")
        assert len(shown(dataset, "#dataset-methods").splitlines()) == 3  # DPO and ORPO share their line


async def test_the_rewards_panel_shows_preference_steps_and_validations_only(monkeypatch):
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.query("#start"), timeout=10, what="the train screen")
        screen = app.screen
        panel = screen.query_one("#rewards")
        assert not panel.display
        app.post_engine_result(step(1))  # an SFT step: no rewards, no panel
        await wait_for(pilot, lambda: "step 1 / 4" in shown(screen, "#train-stats"), timeout=10, what="the step")
        assert not panel.display

        kto = p.PreferenceStats("kto", 0.1234, -0.0456, 0.169, 0.75, 0.0123, None)
        app.post_engine_result(step(2, kto))
        app.post_engine_result(p.Eval(2, 0.66, float("nan"), True, 1.0,
                                      preference=p.PreferenceStats("kto", 0.1, -0.02, 0.12, 0.7, 0.01, None)))
        await wait_for(pilot, lambda: "val 2" in shown(screen, "#rewards-table"), timeout=10, what="the rewards")
        assert panel.display
        table = shown(screen, "#rewards-table").splitlines()
        assert table[0].split() == ["KTO", "desirable", "/", "undesirable", "margin", "accuracy", "KL"]
        assert table[1].split() == ["step", "2", "+0.123", "/", "-0.046", "+0.169", "75%", "0.0123"]
        assert table[2].split() == ["val", "2", "+0.100", "/", "-0.020", "+0.120", "70%", "0.0100"]
        assert screen.query_one("#margin-chart", Sparkline).data == [0.169]
        log = log_text(screen)
        assert "validation loss 0.6600, rewards desirable +0.100" in log and "perplexity nan" not in log

        # a new run (ORPO): the last run's rewards go, the panel stays hidden until its first rewards
        screen._clear_run()
        await pilot.pause()
        assert not panel.display
        orpo = p.PreferenceStats("orpo", -0.5, -0.9, 0.4, 1.0, None, 1.25)
        app.post_engine_result(step(1, orpo))
        await wait_for(pilot, lambda: panel.display, timeout=10, what="the ORPO rewards")
        table = shown(screen, "#rewards-table").splitlines()
        assert table[0].split() == ["ORPO", "chosen", "/", "rejected", "margin", "accuracy", "NLL"]
        assert table[1].split() == ["step", "1", "-0.500", "/", "-0.900", "+0.400", "100%", "1.2500"]
        assert table[2].split() == ["validation", "-"]
        assert screen.query_one("#margin-chart", Sparkline).data == [0.4]


async def test_a_kto_run_in_the_tui_shows_its_rewards(tmp_path, embedded_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    app = labelled_app(tmp_path, method="kto")
    app.cfg.output.run_name = "tui-kto"
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.query("#start"), timeout=10, what="the train screen")
        screen = app.screen
        await pilot.click("#start")
        await wait_for(pilot, lambda: train_state(screen) == "done", timeout=300, what="training to finish")
        assert "step 4 / 4" in shown(screen, "#train-stats")
        assert screen.query_one("#rewards").display
        table = shown(screen, "#rewards-table").splitlines()
        assert table[0].split()[:4] == ["KTO", "desirable", "/", "undesirable"]
        assert table[1].startswith("step 4") and table[2].startswith("val 4")
        # the sparkline: each step's margin, as metrics.jsonl has it (none for a batch without both kinds of rows)
        events = [json.loads(line) for line in (tmp_path / "runs" / "tui-kto" / "metrics.jsonl").open()]
        steps = [e for e in events if e["event"] == "Step"]
        assert len(steps) == 4
        margins = [e["preference"]["margin"] for e in steps if e["preference"]["margin"] is not None]
        assert screen.query_one("#margin-chart", Sparkline).data == pytest.approx(margins)
        log = log_text(screen)
        assert "rewards desirable" in log and "perplexity nan" not in log
