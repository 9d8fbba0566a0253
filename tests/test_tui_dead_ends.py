"""The TUI's dead ends (issue 15), each through the real app with Textual's pilot, the real engine thread
and the embedded model: the config form saves only what the user typed, big inputs stay bounded and
stoppable, errors end what they interrupt, quitting is prompt, and an interrupted run can be resumed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from textual.widgets import Input, Static

from tui.app import LoraTuiApp
from helpers import ROOT, tiny_config, tiny_yaml
from tui_helpers import answering, train_state, wait_for
SIZE = (120, 40)


@pytest.fixture()
def app_in(tmp_path, monkeypatch):
    """An app whose config file is a copy of config.yaml in a temp folder."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    monkeypatch.chdir(ROOT)
    return lambda: LoraTuiApp(str(tmp_path / "config.yaml"))


def notes(app) -> list[str]:
    from tui_helpers import notifications_shown
    return notifications_shown(app)


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
    async with app.run_test(size=SIZE, notifications=True) as pilot:
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


async def test_a_file_value_that_cannot_be_read_is_not_saved_as_the_default(tmp_path, embedded_dir, monkeypatch):
    """`rank: abc` loads as the default 16 (with an error): saving must not quietly write 16 for it."""
    monkeypatch.chdir(ROOT)
    config = tmp_path / "config.yaml"
    config.write_text("lora:\n  rank: abc\n  alpha: 8\n")
    app = LoraTuiApp(str(config))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        assert "✗" in str(app.screen.query_one("#f-lora--rank-msg", Static).render())
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert config.read_text() == "lora:\n  rank: abc\n  alpha: 8\n"
        assert any(m.startswith("Not saved: fix lora.rank") for m in notes(app)), notes(app)
        await type_into(pilot, "rank", "4")
        await pilot.press("ctrl+s")
        await pilot.pause()
    saved = config.read_text()
    assert "  rank: 4\n" in saved and "  alpha: 8.0\n" in saved


# ---------------------------------------------------------------- Dataset screen: a huge line, quitting

def rss_sampler():
    """Start sampling this process's RSS in a thread; calling the result stops it and gives the peak."""
    import threading

    import psutil
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.02)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def stop() -> int:
        done.set()
        thread.join()
        return peak[0]
    return stop


async def test_a_40_mb_first_line_stays_bounded_and_quit_works(app_in, tmp_path, embedded_dir):
    """The preview of the first conversation read whole lines and tokenized a 200 MB one (RSS over 10 GB,
    ctrl+q stuck behind it); validation skips such a line, and so must the preview."""
    import json

    import psutil
    path = tmp_path / "huge.jsonl"
    huge = {"messages": [{"role": "user", "content": "hello world " * ((40 << 20) // 12 + 1000)},
                         {"role": "assistant", "content": "hi"}]}
    good = [{"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in [huge, *good]) + "\n")
    assert path.stat().st_size > 40 << 20
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("#dataset-path", Input).value = str(path)
        before = psutil.Process().memory_info().rss
        peak = rss_sampler()
        await pilot.press("ctrl+v")
        summary = app.screen.query_one("#dataset-summary", Static)
        await wait_for(pilot, lambda: "valid of" in str(summary.render()), timeout=120, what="the report")
        growth = peak() - before
        assert growth < 400 << 20, f"RSS grew by {growth >> 20} MB"
        assert "30 valid of 31" in str(summary.render())
        assert "line 2 through the chat template" in str(app.screen.query_one("#rendered", Static).render())
        errors = app.screen.query_one("#dataset-errors")
        errors.focus()
        await pilot.pause()  # the bad line's preview shows its start, not 40 MB
        preview = str(app.screen.query_one("#line-preview", Static).render())
        assert preview.startswith("line 1:") and len(preview) < 500, preview[:100]
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, timeout=30, what="the app to exit")
    assert app.engine.finished.wait(60), "the engine thread still runs after ctrl+q"


async def test_quit_during_validation_stops_it(app_in, tmp_path, embedded_dir):
    """ctrl+q used to wait for the whole validation (27 s on a large file); now validation stops."""
    lines = (ROOT / "data" / "tool_calls.jsonl").read_text()
    path = tmp_path / "big.jsonl"
    path.write_text(lines * 40)  # 48,000 conversations: a minute or more of validation here
    app = app_in()
    seen: list[str] = []
    emit = app.engine.emit
    app.engine.emit = lambda payload: (seen.append(type(payload).__name__), emit(payload))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("#dataset-path", Input).value = str(path)
        await pilot.press("ctrl+v")
        await wait_for(pilot, lambda: "ProgressUpdate" in seen, timeout=60, what="validation to start")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, timeout=30, what="the app to exit")
    assert app.engine.finished.wait(60), "the engine thread still runs after ctrl+q"
    assert "DatasetChecked" not in seen  # stopped, not run to its end


# ---------------------------------------------------------------- Chat: errors end the answer; long prompts stop

REFUSING_TEMPLATE = ("{% for m in messages %}{% if 'secret' in m['content'] %}"
                     "{{ raise_exception('this model does not tell secrets') }}{% endif %}{% endfor %}")


def model_with_refusing_template(embedded_dir: Path, folder: Path) -> Path:
    """The embedded model with a chat template that rejects some conversations, as real templates do
    (Mistral's "roles must alternate", Gemma's "System role not supported")."""
    import json
    folder.mkdir()
    for item in embedded_dir.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((embedded_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = REFUSING_TEMPLATE + config["chat_template"]
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


async def send(pilot, text: str, max_tokens: int = 4) -> None:
    chat = pilot.app.screen
    chat.query_one("#chat-max", Input).value = str(max_tokens)
    chat.query_one("#chat-input", Input).value = text
    chat.query_one("#chat-input", Input).focus()
    await pilot.press("enter")


def answers(chat) -> list[str]:
    return [b.text for b in chat.query("Bubble.assistant")]


def answered(chat, n: int) -> bool:
    """The n-th answer's bubble is on screen and it has ended (Send is back on)."""
    return len(answers(chat)) == n and not answering(chat)


async def reading_the_prompt(pilot, chat, n: int) -> None:
    """The n-th answer's bubble is up, still empty: the engine, idle until now, took the request at once and
    reads the long prompt (minutes here); a moment more so the reading is under way."""
    await wait_for(pilot, lambda: len(answers(chat)) == n and answering(chat) and not answers(chat)[-1],
                   timeout=30, what="the long prompt")
    await pilot.pause(0.5)


async def test_an_engine_error_ends_the_answer_and_the_next_message_works(tmp_path, embedded_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    app.cfg.model.name = str(model_with_refusing_template(embedded_dir, tmp_path / "model"))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        chat = app.screen
        await send(pilot, "tell me a secret")
        await wait_for(pilot, lambda: answered(chat, 1), timeout=120, what="the failed answer to end")
        assert answers(chat) == ["(no answer: see the error)"]
        assert any("does not tell secrets" in m for m in notes(app)), notes(app)
        await send(pilot, "2+2")
        await wait_for(pilot, lambda: answered(chat, 2), timeout=120, what="the next answer")
        assert answers(chat)[1].strip(), answers(chat)
        assert not any("Still answering" in m for m in notes(app))
        assert [m["role"] for m in chat.history["base"]] == ["user", "assistant"]  # the refused turn is gone


async def test_a_100_kb_message_can_be_stopped_and_quit_ends_the_engine(tmp_path, embedded_dir, monkeypatch):
    """The prompt is read in chunks with a Stop check between them (reading 25k tokens takes minutes here)."""
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    long_message = "Please summarise this. " + "The quick brown fox jumps over the lazy dog. " * 2300
    assert len(long_message) > 100_000
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        chat = app.screen
        await send(pilot, "hi", max_tokens=2)  # loads the model
        await wait_for(pilot, lambda: answered(chat, 1), timeout=120, what="the first answer")
        await send(pilot, long_message)
        await reading_the_prompt(pilot, chat, 2)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not answering(chat), timeout=120, what="the stop")
        assert answers(chat)[-1] == " [stopped]"
        await send(pilot, "2+2")
        await wait_for(pilot, lambda: answered(chat, 3), timeout=120, what="the next answer")
        assert answers(chat)[-1].strip() and "[stopped]" not in answers(chat)[-1]
        await send(pilot, long_message)
        await reading_the_prompt(pilot, chat, 4)
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, timeout=30, what="the app to exit")
    assert app.engine.finished.wait(120), "the engine thread still runs after ctrl+q"


CHILD_CHAT = """
import sys
from tui.app import LoraTuiApp

async def quit_during_a_long_prompt(pilot):
    app = pilot.app
    await pilot.press("f4")
    while not (app.current_mode == "chat" and app.screen.query("#chat-input")):
        await pilot.pause(0.05)
    app.screen.query_one("#chat-input").value = "Summarise: " + "The quick brown fox jumps over the lazy dog. " * 2300
    app.screen.query_one("#chat-input").focus()
    await pilot.press("enter")
    while not app.screen.query("Bubble.assistant"):  # the answer's bubble is up: the idle engine reads the prompt
        await pilot.pause(0.05)
    await pilot.pause(0.5)
    print("reading the prompt", flush=True)
    await pilot.press("ctrl+q")

app = LoraTuiApp(None)
app.run(headless=True, size=(120, 40), auto_pilot=quit_during_a_long_prompt)
sys.exit(app.return_code)
"""


def test_the_process_ends_on_ctrl_q_while_a_long_prompt_is_read(tmp_path, embedded_dir):
    """The real app in its own process: ctrl+q while a 100 kB message is read used to leave the process
    running until the whole prompt was read (minutes here)."""
    import os
    import subprocess
    import sys
    script = tmp_path / "child_chat.py"
    script.write_text(CHILD_CHAT)
    child = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        out, err = child.communicate(timeout=180)
    finally:
        child.kill()
    assert b"reading the prompt" in out, err.decode()[-2000:]
    assert child.returncode == 0, err.decode()[-2000:]


# ---------------------------------------------------------------- following a run folder with bad lines

async def test_following_a_run_with_bad_metric_lines_skips_them(tmp_path, embedded_dir, monkeypatch):
    """A string loss crashed the whole app; junk lines and wrong types are now reported and skipped."""
    import json
    monkeypatch.chdir(ROOT)
    run = tmp_path / "runs" / "odd"
    run.mkdir(parents=True)
    memory = {"rss_bytes": 1, "system_used_bytes": 1, "system_total_bytes": 2, "mlx_active_bytes": 0,
              "mlx_peak_bytes": 0}

    def step(n, **changes):
        return {"event": "Step", "time": 1.0, "step": n, "total_steps": 3, "epoch": 0.1 * n, "loss": 1.0 / n,
                "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 5.0, "steps_per_sec": 1.0,
                "eta_seconds": 3.0, "tokens_seen": 40 * n, "memory": memory} | changes
    lines = [json.dumps(step(1)), json.dumps(step(2, loss="high")), "junk {", "[1, 2]",
             json.dumps(step(2, memory="lots")), json.dumps({"event": "CheckpointSaved", "step": 2, "path": "x",
                                                              "reason": "interval", "is_best": True, "kept": "x"}),
             json.dumps(step(3)),
             json.dumps({"event": "Finished", "step": 3, "stopped_early": False, "final_loss": 0.3,
                         "best_val_loss": None, "adapter_path": "a", "report_path": "r"})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    app = LoraTuiApp(None)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#external", Input).value = str(run)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: train_state(screen) == "done", timeout=30, what="the followed run to end")
        assert app.is_running
        assert screen.query_one("#loss-chart").data == [1.0, 1.0 / 3]
        log = "".join(line.text for line in screen.query_one("#train-log").lines)  # its lines wrap
        assert "metrics.jsonl:2: skipped, Step.loss is \"high\"" in log, log
        assert "metrics.jsonl:3: skipped, not JSON" in log
        assert "later bad lines are skipped" in log


# ---------------------------------------------------------------- resuming an interrupted run from the Train screen

CHILD_APP = """
import sys
from tui.app import LoraTuiApp

async def start_training(pilot):
    app = pilot.app
    await pilot.press("f3")
    while not (app.current_mode == "train" and app.screen.query("#start")):
        await pilot.pause(0.05)
    await pilot.press("ctrl+t")
    while True:  # train until killed
        await pilot.pause(0.5)

LoraTuiApp(sys.argv[1]).run(headless=True, size=(120, 40), auto_pilot=start_training)
"""


def log_text(screen) -> str:
    """The Train screen's log as one line of words (it wraps its lines at the screen's width)."""
    return " ".join(word for line in screen.query_one("#train-log").lines for word in line.text.split())


def digest(folder: Path) -> dict[str, str]:
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def checkpoints(run_dir: Path) -> dict[int, dict[str, str]]:
    """{step: file digests} of every complete checkpoint."""
    return {int(p.name[5:]): digest(p) for p in sorted((run_dir / "checkpoints").glob("step_*"))
            if (p / "trainer_state.json").is_file()}


def kill_app_after_first_checkpoint(config: Path, run_dir: Path, tmp_path: Path) -> None:
    """The real app in a child process (headless, driven by an auto-pilot that presses F3 and ctrl+t), killed
    with SIGKILL as soon as a checkpoint is on disk."""
    import signal
    import subprocess
    import sys
    import time
    script = tmp_path / "child_app.py"
    script.write_text(CHILD_APP)
    child = subprocess.Popen([sys.executable, str(script), str(config)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        while not checkpoints(run_dir) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=60)
    assert checkpoints(run_dir), f"the child app never saved a checkpoint: {err.decode()[-2000:]}"


async def test_resume_a_killed_run_from_the_train_screen(tmp_path, embedded_dir, monkeypatch):
    """Killed mid-run, relaunched: ctrl+t offers to resume, and the run ends at its full step count from the
    last checkpoint, with every earlier checkpoint as it was (a fresh start used to overwrite and prune them)."""
    import json

    from engine.train.run_folder import run_state
    from tui.screens.confirm import ConfirmScreen
    monkeypatch.chdir(ROOT)
    # Enough steps that the SIGKILL lands mid-run even when the poller is starved on a loaded 2-core machine.
    STEPS = 30  # noqa: N806
    config = tiny_yaml(tmp_path, "config.yaml", training={"iterations": STEPS}, evaluation={"every_steps": 6},
                       checkpoints={"keep_last": 100},  # nothing is pruned: every checkpoint must survive
                       output={"run_name": "tui"})
    run_dir = tmp_path / "runs" / "tui"
    kill_app_after_first_checkpoint(config, run_dir, tmp_path)
    before = checkpoints(run_dir)
    last = max(before)
    assert run_state(run_dir).state == "interrupted" and last < STEPS

    app = LoraTuiApp(str(config))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.current_mode == "train" and app.screen.query("#start"), timeout=30,
                       what="the train screen")
        screen = app.screen
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=10, what="the resume offer")
        assert f"Resume from step {last}" in str(app.screen.query_one("#yes").label)
        await pilot.press("y")
        await wait_for(pilot, lambda: train_state(screen) == "done", timeout=300, what="the resumed run to end")
        assert f"started: {STEPS} steps from step {last}," in log_text(screen)
        assert f"step {STEPS} / {STEPS}" in str(screen.query_one("#train-stats", Static).render())
    after = checkpoints(run_dir)
    assert {step: after.get(step) for step in before} == before  # the earlier checkpoints, untouched
    assert sorted(after) == list(range(2, STEPS + 1, 2))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "finished" and report["step"] == STEPS


async def test_declining_the_resume_starts_a_new_run_and_keeps_the_old(tmp_path, embedded_dir, monkeypatch):
    from engine.train.run_folder import run_state
    from engine.train.run import TrainingRun
    from tui.screens.confirm import ConfirmScreen
    monkeypatch.chdir(ROOT)
    cfg = tiny_config(tmp_path, training={"iterations": 4}, output={"run_name": "tui"})
    result = TrainingRun(cfg, stop_after=2).run()  # stopped before the end: a run to resume
    run_dir = Path(cfg.output.dir) / "tui"
    assert result.step == 2 and run_state(run_dir).state == "interrupted"
    before = checkpoints(run_dir)
    app = LoraTuiApp(None)
    app.cfg = cfg
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.current_mode == "train" and app.screen.query("#start"), timeout=30,
                       what="the train screen")
        screen = app.screen
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=10, what="the resume offer")
        await pilot.press("escape")  # cancel: nothing starts
        await pilot.pause()
        assert train_state(screen) == "idle" and not (Path(cfg.output.dir) / "tui-2").exists()
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=10, what="the resume offer")
        await pilot.press("n")
        await wait_for(pilot, lambda: train_state(screen) == "done", timeout=300, what="the new run to end")
        assert "step 4 / 4" in str(screen.query_one("#train-stats", Static).render())
    assert run_state(Path(cfg.output.dir) / "tui-2").state == "finished"
    assert checkpoints(run_dir) == before
    assert run_state(run_dir).state == "interrupted"
