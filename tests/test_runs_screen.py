"""The Runs screen (F5) and its braille plot: the runs table with statuses, marking runs to overlay their
curves and compare settings, delete, chat with a run's adapter, resume a killed run on the Train screen; SVG
snapshots at 120x40 and 80x24 of hand-written runs (fixed times and values); the plot drawn cell by cell."""

import calendar
import json
import math
import os
import shutil
import time

import pytest

from engine import protocol as ev
from engine.config.loading import save_config
from engine.config.schema import Config
from engine.train.run import TrainingRun
from engine.train.run_folder import RunLock
from helpers import ROOT, tiny_config
from tui.app import LoraTuiApp
from tui.screens.chat_screen import ChatScreen
from tui.screens.train_screen import TrainScreen
from tui.widgets.plot import BRAILLE, PALETTE, LinePlot, Series, plot_lines
from tui_helpers import train_state, wait_for

SIZE = (120, 40)


# ------------------------------------------------------------------------------------------- the plot

def cell_bits(strip, column: int) -> int:
    char = strip.text[column]
    return 0 if char == " " else ord(char) - BRAILLE


def test_a_flat_series_lands_on_one_row_of_dots():
    # 12 x 4 cells: legend, 2 plot rows, x axis; y 4.5..5.5 (a single value gets room), gutter "5┤".
    lines = plot_lines([Series("flat", [(0, 5.0), (15, 5.0)])], 12, 4)
    assert [len(s.text) for s in lines] == [12] * 4
    assert lines[0].text.startswith("━━ flat")
    assert lines[1].text == " │" + " " * 10
    assert lines[2].text == "5┤" + "⠉" * 10  # dot row 4 of 8: the top dots of the second row
    assert lines[3].text.startswith(" └0─")
    colors = {seg.style.color.name for seg in lines[2] if seg.text.strip("⠉") == "" and seg.style}
    assert PALETTE[0] in colors


def test_a_rising_line_goes_from_the_bottom_left_to_the_top_right_dot():
    lines = plot_lines([Series("up", [(0, 0.0), (15, 1.0)])], 10, 4)
    top, bottom = lines[1].text[2:], lines[2].text[2:]  # after the "1┤" / "0┤" gutter
    assert lines[1].text[:2] == "1┤" and lines[2].text[:2] == "0┤"
    assert cell_bits(lines[2], 2) & 0x40  # the lowest left dot of the first cell
    assert cell_bits(lines[1], 9) & 0x08  # the highest right dot of the last cell
    assert top[0] == " " and bottom[-1] == " "


def test_axes_legend_and_awkward_series():
    series = [Series("a train", [(i, 5 - i / 50) for i in range(101)]),
              Series("a val", [(0, math.nan), (50, 4.0), (100, math.inf), (100, 3.2)]),
              Series("empty", []), Series("one", [(30, 4.5)])]
    lines = plot_lines(series, 60, 12)
    text = "\n".join(s.text for s in lines)
    assert all(name in lines[0].text for name in ("a train", "a val", "empty", "one"))
    assert "0" in lines[-1].text and "100" in lines[-1].text and "50" in lines[-1].text  # x ticks on the axis
    assert [s.text[:2] for s in lines[1:-1] if "┤" in s.text] == ["5┤", "4┤", "3┤"]  # round y ticks
    assert "nan" not in text and "inf" not in text
    assert "no data" in "\n".join(s.text for s in plot_lines([Series("empty", [])], 30, 6))
    assert [len(s.text) for s in plot_lines(series, 25, 5)] == [25] * 5  # any size, the same rows drawn to it
    assert plot_lines(series, 0, 0) == [] and len(plot_lines(series, 5, 1)) == 1


# -------------------------------------------------------------------------------- real runs for the app

@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_dir):
    """alpha: 4 steps, finished; beta: lr 5e-4, stopped at step 2; gamma: beta killed (no report, no end)."""
    base = tmp_path_factory.mktemp("runs-screen")
    assert TrainingRun(tiny_config(base, output={"run_name": "alpha"})).run().status == "finished"
    beta = tiny_config(base, training={"learning_rate": 5e-4}, output={"run_name": "beta"})
    assert TrainingRun(beta, stop_after=2).run().status == "stopped"
    runs = base / "runs"
    shutil.copytree(runs / "beta", runs / "gamma")
    kill(runs / "gamma")
    return runs


def kill(run_dir):
    """What a kill -9 after the checkpoint of step 2 leaves: no adapter, no report, no end in the log."""
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "report.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(x for x in lines if '"Finished"' not in x))


@pytest.fixture()
def app_on_runs(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs)
    app = LoraTuiApp(None)
    app.cfg.output.dir = str(runs)
    return app, runs


async def open_runs(pilot, count: int):
    await pilot.press("f5")
    table = pilot.app.screen.query_one("#runs-table")
    await wait_for(pilot, lambda: table.row_count == count, what=f"{count} runs listed")
    return pilot.app.screen, table


async def cursor_to(pilot, table, name: str):
    table.move_cursor(row=table.get_row_index(name))
    await pilot.pause()


def row(table, name: str) -> list[str]:
    return [str(cell) for cell in table.get_row(name)]


async def test_the_table_lists_runs_newest_first_with_their_status(app_on_runs, embedded_dir):
    app, runs = app_on_runs
    async with app.run_test(size=SIZE) as pilot:
        screen, table = await open_runs(pilot, 3)
        assert [str(k.value) for k in table.rows] == ["gamma", "beta", "alpha"]  # gamma: beta's start, copied
        assert row(table, "alpha")[1:5] == ["alpha", "finished", "sft", "4/4"]
        assert row(table, "beta")[2:5] == ["stopped", "sft", "2/4"]
        assert row(table, "gamma")[2] == "killed"
        assert "3 runs in" in str(screen.query_one("#runs-summary").render())


async def test_marking_two_runs_overlays_their_curves_and_shows_the_setting_that_differs(app_on_runs, embedded_dir):
    app, _ = app_on_runs
    async with app.run_test(size=SIZE) as pilot:
        screen, table = await open_runs(pilot, 3)
        await cursor_to(pilot, table, "alpha")
        await pilot.press("space")
        await cursor_to(pilot, table, "beta")
        await pilot.press("enter")
        plot = screen.query_one("#runs-plot", LinePlot)
        assert [s.name for s in plot.series] == ["alpha train", "alpha val", "beta train", "beta val"]
        assert [len(s.points) for s in plot.series] == [4, 2, 2, 1]
        legend = plot.render_line(0).text
        assert "alpha train" in legend and "beta val" in legend
        diff = str(screen.query_one("#runs-diff").render())
        assert "training.learning_rate" in diff and "0.001" in diff and "0.0005" in diff
        assert "output.run_name" not in diff
        assert row(table, "alpha")[0] == row(table, "beta")[0] == "●"
        await pilot.press("space")  # beta unmarked: one run left, its details instead of a diff
        assert [s.name for s in plot.series] == ["alpha train", "alpha val"]
        assert "training.learning_rate" not in str(screen.query_one("#runs-diff").render())


async def test_a_rescan_changes_only_the_cells_that_changed_and_keeps_cursor_and_marks(app_on_runs, embedded_dir):
    app, runs = app_on_runs
    async with app.run_test(size=SIZE) as pilot:
        screen, table = await open_runs(pilot, 3)
        await cursor_to(pilot, table, "beta")
        await pilot.press("space")
        plot, side = screen.query_one("#runs-plot", LinePlot), screen.query_one("#runs-diff")
        await pilot.pause()
        series, details, drawn = plot.series, str(side.render()), plot._drawn  # the chart as drawn
        assert drawn is not None
        cleared = []
        clear = table.clear
        table.clear = lambda *a, **k: (cleared.append(1), clear(*a, **k))[1]
        with RunLock(runs / "gamma"):  # gamma trains again (a process holds its lock): a rescan (the
            await pilot.press("ctrl+r")  # same every 3 s while it trains) changes its status cell only
            await wait_for(pilot, lambda: row(table, "gamma")[2] == "running", what="gamma running")
        assert cleared == [] and [str(k.value) for k in table.rows] == ["gamma", "beta", "alpha"]
        assert table.cursor_row == 1 and row(table, "beta")[0] == "●" and screen.marked == ["beta"]
        assert plot.series == series and plot._drawn is drawn and str(side.render()) == details  # not redrawn
        shutil.copytree(runs / "alpha", runs / "delta")  # a new run: the table is rebuilt around the cursor
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: table.row_count == 4, what="4 runs listed")
        assert cleared == [1] and str(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value) == "beta"
        assert row(table, "beta")[0] == "●" and row(table, "delta")[0] == " " and plot.series == series


async def test_delete_asks_first_then_removes_the_run(app_on_runs, embedded_dir):
    app, runs = app_on_runs
    async with app.run_test(size=SIZE) as pilot:
        screen, table = await open_runs(pilot, 3)
        await cursor_to(pilot, table, "alpha")
        await pilot.press("d")
        await pilot.pause()
        assert "Delete alpha?" in str(app.screen.query_one("Label").render())
        await pilot.press("n")  # kept
        await pilot.pause()
        assert (runs / "alpha").is_dir()
        await pilot.press("d")
        await pilot.pause()
        await pilot.press("y")
        await wait_for(pilot, lambda: table.row_count == 2, what="the run gone from the table")
        assert not (runs / "alpha").exists() and "alpha" not in [str(k.value) for k in table.rows]


async def test_c_opens_the_chat_with_the_runs_adapter_chosen(app_on_runs, embedded_dir):
    app, runs = app_on_runs
    async with app.run_test(size=SIZE) as pilot:
        screen, table = await open_runs(pilot, 3)
        await cursor_to(pilot, table, "alpha")
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat screen")
        await pilot.pause()
        assert app.screen.query_one("#chat-model").value == str(runs / "alpha" / "adapter")
        await pilot.press("f5")  # a killed run has no adapter: its newest checkpoint is chosen
        await cursor_to(pilot, table, "gamma")
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat screen")
        await pilot.pause()
        assert app.screen.query_one("#chat-model").value == str(runs / "gamma" / "checkpoints" / "step_000002")


async def test_r_resumes_a_killed_run_on_the_train_screen_and_it_finishes(app_on_runs, embedded_dir):
    app, runs = app_on_runs
    async with app.run_test(size=SIZE) as pilot:
        screen, table = await open_runs(pilot, 3)
        await cursor_to(pilot, table, "alpha")
        await pilot.press("r")  # finished: nothing to resume, no question asked
        await pilot.pause()
        assert app.screen is screen
        await cursor_to(pilot, table, "gamma")
        await pilot.press("r")
        await pilot.pause()
        assert "from its checkpoint at step 2" in str(app.screen.query_one("Label").render())
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen), what="the train screen")
        train = app.screen
        await wait_for(pilot, lambda: train_state(train) == "done", timeout=120, what="the resumed run to end")
        report = json.loads((runs / "gamma" / "report.json").read_text())
        assert report["status"] == "finished" and report["step"] == 4
        assert report["config"]["training"]["learning_rate"] == 5e-4  # the run's own settings, not the app's
        await pilot.press("f5")
        await wait_for(pilot, lambda: row(table, "gamma")[2] == "finished", what="gamma listed as finished")


# ------------------------------------------------------------------------ snapshots of hand-written runs

T0 = calendar.timegm((2026, 3, 1, 9, 0, 0))  # the first run starts at 09:00 UTC


def write_run(root, name: str, end: str | None, started: float, lr: float, steps: int, total: int = 60,
              report: dict | None = None):
    """A run folder as lora-tui writes it, with fixed times and losses: `end` is "finished", "stopped",
    "failed" or None (killed: a checkpoint at the last multiple of 10, no end)."""
    folder = root / name
    folder.mkdir(parents=True)
    cfg = Config()
    cfg.training.learning_rate, cfg.training.iterations, cfg.output.run_name = lr, total, name
    save_config(cfg, folder / "config.yaml")
    train = [(s, 2.0 + 1.5 * math.exp(-s * lr * 50) + 0.1 * math.sin(s)) for s in range(1, steps + 1)]
    vals = [(s, 2.1 + 1.2 * math.exp(-s * lr * 50)) for s in range(10, steps + 1, 10)]
    events = [ev.Started(str(folder), total, 0, 1.0, 32, 8, 15360, 134515008, 2, "cpu", "mkl", "float32",
                         time=started).to_dict()]
    events += [{"event": "Step", "time": started + 5 * s, "step": s, "total_steps": total, "loss": loss}
               for s, loss in train]
    events += [{"event": "Eval", "time": started + 5 * s + 1, "step": s, "val_loss": v} for s, v in vals]
    done = started + 5 * steps + 2
    best = min(v for _, v in vals) if vals else None
    if end in ("finished", "stopped"):
        events.append(ev.Finished(steps, end == "stopped", train[-1][1], best, "", "", time=done).to_dict())
        (folder / "report.json").write_text(json.dumps({"status": end, "step": steps, "total_steps": total,
                                                        "best_val_loss": best, "seconds": done - started,
                                                        "method": "sft", **(report or {})}))
    elif end == "failed":
        events.append(ev.Failed(steps, "training diverged at step 13: loss is nan", None, time=done).to_dict())
    if end in ("stopped", None):
        checkpoint = folder / "checkpoints" / f"step_{steps // 10 * 10:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": steps // 10 * 10, "elapsed": 1.0}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


@pytest.fixture()
def utc():
    """Local time is UTC for the test (the table shows start times in local time)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture()
def snapshot_app(tmp_path, monkeypatch, utc):
    """An app on five hand-written runs (one held by a live lock: running) in ./runs."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    scores = {"tool_calls": {"prompts": 40, "exact": 0.8, "right_tool": 0.9}, "answers": {"faithful": 0.75}}
    write_run(runs, "lr-1e-3", "finished", T0, 1e-3, 60, report=scores)
    write_run(runs, "lr-5e-4", "finished", T0 + 3600, 5e-4, 60)
    write_run(runs, "long-run", None, T0 + 7200, 8e-4, 35)
    write_run(runs, "diverged", "failed", T0 + 9000, 1e-2, 12)
    live = write_run(runs, "live", None, T0 + 10800, 2e-4, 8)
    with RunLock(live):
        app = LoraTuiApp(None)
        app.cfg.output.dir = "runs"
        yield app


async def mark_two_runs(pilot):
    screen, table = await open_runs(pilot, 5)
    await cursor_to(pilot, table, "lr-1e-3")
    await pilot.press("space")
    await cursor_to(pilot, table, "lr-5e-4")
    await pilot.press("space")
    await pilot.pause()


def test_runs_screen_at_120x40(snap_compare, snapshot_app):
    assert snap_compare(snapshot_app, terminal_size=(120, 40), run_before=mark_two_runs)


def test_runs_screen_at_80x24(snap_compare, snapshot_app):
    assert snap_compare(snapshot_app, terminal_size=(80, 24), run_before=mark_two_runs)
