"""End to end, as a new user: run `lora-tui` in tmux, edit a field and save, validate the sample dataset,
train 5 steps, chat with the adapter, quit. The screen is read with `capture-pane` and checked for what a
person would see."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import ROOT

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None and not os.environ.get("CI"), reason="tmux is not installed")


class Terminal:
    def __init__(self, name: str, command: str, env: dict):
        self.name = name
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        # Start a shell at 120x40 first and type the command into it: a program started directly by
        # new-session can read the terminal size before tmux has applied -x/-y (and get 80x24).
        subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", "120", "-y", "40"], check=True)
        time.sleep(0.5)
        # printf, so that the typed command line itself never contains the marker we wait for
        line = f"cd {ROOT} && env {exports} {command}; printf 'EXIT-%s=%s\\n' CODE $?"
        subprocess.run([TMUX, "send-keys", "-t", name, "-l", line], check=True)
        subprocess.run([TMUX, "send-keys", "-t", name, "Enter"], check=True)

    def screen(self) -> str:
        return subprocess.run([TMUX, "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run([TMUX, "send-keys", "-t", self.name, *(["-l"] if literal else []), *keys], check=True)
        time.sleep(0.3)

    def type(self, text: str) -> None:
        self.keys(text, literal=True)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.25)
        raise AssertionError(f"{text!r} never appeared; the screen shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([TMUX, "kill-session", "-t", self.name], capture_output=True)


def test_new_user_session(tmp_path, embedded_dir):
    config = tmp_path / "config.yaml"
    text = (ROOT / "config.yaml").read_text()
    text = text.replace("  batch_size: 2\n", "  batch_size: 1\n").replace("  grad_accumulation: 4\n",
                                                                        "  grad_accumulation: 1\n")
    text = text.replace("  warmup_steps: 10\n", "  warmup_steps: 2\n")
    text = text.replace("  num_layers: -1\n", "  num_layers: 4\n").replace("  val_batches: 25\n", "  val_batches: 2\n")
    text = text.replace("sample_prompts: [", "sample_prompts: []\n  unused: [").replace("  unused: [", "  #")
    # The end of a run scores the held-out file (100 prompts, base and tuned): minutes on 2 cores, not this tour's
    # subject, as the sample prompts above are not.
    text = text.replace("  heldout_path: data/heldout.jsonl\n", "  heldout_path: ''\n")
    text = text.replace("  dir: runs\n", f"  dir: {tmp_path / 'runs'}\n").replace("  run_name: ''\n", "  run_name: e2e\n")
    config.write_text(text)
    env = {"LORA_TUI_CACHE": os.environ["LORA_TUI_CACHE"], "TERM": "xterm-256color"}
    term = Terminal(f"lora-e2e-{os.getpid()}", f"{sys.executable} -m tui --config {config}", env)
    try:
        term.wait_for("Base model", 30)
        # 1. edit a field (find it by name) and save
        term.type("iterations")
        term.wait_for("iterations")  # in the search box: typed keys are read before Enter jumps
        term.keys("Enter")
        term.wait_for("Optimizer steps to run")  # the training tab, the field focused: only now type into it
        term.type("5")
        term.wait_for("unsaved")
        term.keys("C-s")
        term.wait_for("Saved")
        assert "  iterations: 5\n" in config.read_text()
        # 2. validate the sample dataset
        term.keys("F2")
        term.wait_for("Validate")
        term.keys("C-v")
        screen = term.wait_for("1440 valid of 1440 conversations", 60)
        assert "will train on 1072" in screen and "trained" in screen
        # 3. train 5 steps
        term.keys("F3")
        term.wait_for("Start")
        term.keys("C-t")
        screen = term.wait_for("step 5 / 5", 240)
        screen = term.wait_for("Training finished", 120)
        assert "loss" in screen and "tokens/s" in screen and "MLX peak" in screen
        # 4. chat with the adapter
        term.keys("F4")
        screen = term.wait_for("e2e/adapter", 20)
        term.type("What's the weather in Lisbon?")
        term.keys("Enter")
        title = "adapter runs/e2e/adapter"
        term.wait_for(title, 30)
        deadline = time.time() + 120
        while time.time() < deadline:  # the answer streams into the bubble under that title
            answer = term.screen().split(title, 1)[-1].split("╰", 1)[0]
            if any(c.isalpha() for c in answer):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the adapter never answered:\n" + term.screen())
        # 5. quit
        term.keys("C-q")
        screen = term.wait_for("EXIT-CODE=", 60)
        assert "EXIT-CODE=0" in screen and "Traceback" not in screen
    finally:
        term.close()
