"""End to end, as a user compares runs and reviews answers: two short runs made with the CLI (learning rates
1e-3 and 1e-5), then `lora-tui` in tmux on the same config: F5 lists both as finished and, with both marked,
overlays their train and validation curves (the legend names all four series) and lists the setting that
differs; F6 reviews the base model against one run's adapter on four typed prompts, judges them with 1, 2, t
and b, labels two answers d and u, shows the tally; ctrl+q. The labels file then validates and trains (SFT,
and KTO since it holds both labels) with the CLI, and the session file holds the four judgements. The
screen is read with `capture-pane`; every wait polls it with a timeout."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from engine.review.session import BASE, ReviewSession, session_files
from helpers import ROOT, lora_tui, lora_tui_cmd, tiny_yaml
from test_e2e_tmux import TMUX, Terminal

pytestmark = pytest.mark.skipif(TMUX is None and not os.environ.get("CI"), reason="tmux is not installed")

RUNS = {"lr-high": "1e-3", "lr-low": "1e-5"}  # run name -> learning rate: curves that differ
PROMPTS = ["What is 2+3?", "Name a colour.", "Say hello.", "12+7"]
VERDICT_KEYS = [("1", "left", "A (left) better"), ("2", "right", "B (right) better"), ("t", "tie", "tie"),
                ("b", "both-bad", "both bad")]


def wait_until(term: Terminal, what: str, condition, timeout: float = 60.0) -> str:
    """Poll the pane until `condition(screen)` holds; the screen it held on."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        screen = term.screen()
        if condition(screen):
            return screen
        time.sleep(0.25)
    raise AssertionError(f"{what}: never seen; the screen shows:\n{term.screen()}")


def answer_panels(screen: str) -> str:
    """The two answer panels' rows (from their top border to the tally's)."""
    lines = screen.splitlines()
    top = next((i for i, line in enumerate(lines) if "╭─ A (left)" in line), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("─Tally")), None)
    return "" if top is None or end is None else "\n".join(lines[top:end])


def both_answered(prompt: int):
    """Prompt `prompt` of 4 is shown with both answers in (no panel says "answering…")."""
    def check(screen: str) -> bool:
        panels = answer_panels(screen)
        return f"Prompt {prompt}/4" in screen and bool(panels) and "answering…" not in panels
    return check


def test_compare_runs_then_review_and_train_on_the_labels(tmp_path, embedded_dir):
    t0 = time.time()
    config = tiny_yaml(tmp_path)  # runs under tmp_path/runs, data: 40 addition chats, 4 steps
    runs = tmp_path / "runs"
    base_env = {**os.environ, "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    # (a) two real runs with the CLI, side by side (one thread each)
    children = {name: subprocess.Popen(lora_tui_cmd("--config", config, "train", "--run-name", name), cwd=ROOT,
                                       env={**base_env, "LORA_TUI__TRAINING__LEARNING_RATE": lr},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for name, lr in RUNS.items()}
    for name, child in children.items():
        out, _ = child.communicate(timeout=240)
        assert child.returncode == 0, out
        assert f"finished at step 4; adapter in {runs / name / 'adapter'}" in out, out

    env = {"LORA_TUI_CACHE": os.environ["LORA_TUI_CACHE"], "TERM": "xterm-256color",
           "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    term = Terminal(f"lora-e2e-review-{os.getpid()}", f"{sys.executable} -m tui --config {config}", env)
    try:
        term.wait_for("Base model", 30)
        # (b) Runs: both finished; both marked -> four series in the legend, the learning rate differs
        term.keys("F5")
        screen = wait_until(term, "both runs, finished", lambda s: "2 runs in" in s and all(
            re.search(rf"{name}\s+finished\s+sft\s+4/4", s) for name in RUNS), 30)
        term.keys("Space")
        term.keys("Down")
        term.keys("Space")
        order = sorted(RUNS, key=screen.index)  # the table's order (newest first): the order marked
        legend = "   ".join(f"━━ {name} {kind}" for name in order for kind in ("train", "val"))
        screen = wait_until(term, "the legend of both runs' curves", lambda s: legend in s, 20)
        assert "settings that differ" in screen and "training.learning_rate" in screen
        assert re.search(r"lr-high: 0\.001\b", screen) and re.search(r"lr-low: 1e-05\b", screen)
        assert screen.count("●") == 2  # both rows marked

        # (c) Review: the base model against lr-high's adapter (the newest run's is preselected: pick it)
        term.keys("F6")
        term.wait_for("Pick two sources", 30)
        term.keys("Tab", "Tab", "Tab")  # from the left answer: right answer, first source, second source
        term.keys("Enter")
        term.wait_for("lr-high/checkpoints/step_000002", 10)  # the list of sources is open
        term.type("lr-high/adapter")  # type to search
        term.keys("Enter")
        wait_until(term, "lr-high's adapter picked", lambda s: "lr-high/checkpoints" not in s and re.search(
            r"base model\s+▼.*lr-high/adapter\s+▼", s), 10)
        term.keys("Tab", "Enter")  # the prompts: typed, not held-out
        term.type("typed")
        term.keys("Enter")
        wait_until(term, "typed prompts picked", lambda s: re.search(r"lr-high/adapter\s+▼.*typed\s+▼", s), 10)
        term.keys("Tab", "Tab")  # past Start, into the prompt box: Enter there starts the session
        for n, prompt in enumerate(PROMPTS, 1):
            term.type(prompt)
            term.keys("Enter")
            term.wait_for(f"0/{n} judged", 20)
        term.wait_for("Prompt 1/4 · typed", 10)
        term.keys("Escape")  # from the prompt box to the answers
        for n, (key, _, said) in enumerate(VERDICT_KEYS, 1):
            if n > 1:
                term.keys("n")
            screen = wait_until(term, f"both answers of prompt {n}", both_answered(n), 120)
            assert "A (left): " not in screen and "B (right): " not in screen  # blind until judged
            term.keys(key)
            screen = term.wait_for(f"judged: {said}", 10)
            term.wait_for(f"{n}/4 judged", 10)
        # the sources are revealed once judged
        titles = answer_panels(screen).splitlines()[0]
        assert {"base model", "lr-high/adapter"} <= set(re.findall(r"\((?:left|right)\): ([\w/ -]+?) ─", titles))
        term.keys("d")  # the left answer (focused) of the last prompt is desirable
        term.wait_for("· desirable", 10)
        term.keys("Tab", "u")  # the right one undesirable
        term.wait_for("· undesirable", 10)

        def tally(screen: str):
            found = [re.search(rf"^ {re.escape(name)}: (\d+)W (\d+)L (\d+)T (\d+) both bad", screen, re.M)
                     for name in ("base model", "lr-high/adapter")]
            return None if None in found else [tuple(int(g) for g in m.groups()) for m in found]
        screen = wait_until(term, "the tally", lambda s: tally(s) is not None, 10)
        (bw, bl, bt, bb), (aw, al, at, ab) = tally(screen)
        assert (bw + aw, bw, bl, bt, bb, at, ab) == (2, al, aw, 1, 1, 1, 1), screen
        term.keys("C-q")
        screen = term.wait_for("EXIT-CODE=", 60)
        assert "EXIT-CODE=0" in screen and "Traceback" not in screen
    finally:
        term.close()
    app_done = time.time()

    # (e) the session file: the four prompts, their answers, the judgements in order, the two labels
    adapter = str(runs / "lr-high" / "adapter")
    [path] = session_files(runs / "review")
    session = ReviewSession.load(path)
    assert session.sources == [BASE, adapter] and session.prompt_source == "typed"
    assert [item["messages"] for item in session.items] == [[{"role": "user", "content": p}] for p in PROMPTS]
    assert [session.verdict(i) for i in range(4)] == [verdict for _, verdict, _ in VERDICT_KEYS]
    assert session.finished and all(session.answered(i) for i in range(4))
    assert [(x["side"], x["label"]) for x in session.labels[3]] == [("left", "desirable"), ("right", "undesirable")]
    assert sum(map(len, session.labels)) == 2
    saved = json.loads(path.read_text())
    assert [t["ties"] for t in saved["tally"]] == [1, 1] and sum(t["wins"] for t in saved["tally"]) == 2

    # (d) the labels file: two rows of the last prompt with the answers shown, validated and trained on
    labels = runs / "review" / "labels.jsonl"
    assert session.labels_path == str(labels)
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    expected = [(session.answer_on(3, side), label)
                for side, label in (("left", "desirable"), ("right", "undesirable"))]
    assert [(r["conversations"][:-1], r["conversations"][-1]["role"], r["conversations"][-1]["content"], r["label"])
            for r in rows] == [([{"role": "user", "content": PROMPTS[3]}], "assistant", a, lab) for a, lab in expected]
    done = lora_tui("--config", config, "validate", "--dataset", labels, env=base_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 conversations valid" in done.stdout and "KTO: 1 desirable + 1 undesirable" in done.stdout
    # one desirable row for SFT and two rows for KTO: a micro-batch of one
    methods = ["sft"] + (["kto"] if {r["label"] for r in rows} == {"desirable", "undesirable"} else [])
    assert methods == ["sft", "kto"]
    for method in methods:
        done = lora_tui("--config", config, "train", "--dataset", labels, "--iterations", 2, "--method", method,
                        "--run-name", f"from-labels-{method}",
                        env={**base_env, "LORA_TUI__TRAINING__BATCH_SIZE": "1"})
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        assert f"finished at step 2; adapter in {runs / f'from-labels-{method}' / 'adapter'}" in out, out
    print(f"\nruns and the app done at {app_done - t0:.0f} s, labels validated and trained at {time.time() - t0:.0f} s")
