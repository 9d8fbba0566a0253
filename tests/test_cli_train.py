"""Headless train / chat / fuse through the real `lora-tui` entry point, as a user runs them."""

import json
import signal
import subprocess

import pytest

from helpers import ROOT, increments, lora_tui, lora_tui_cmd, tiny_yaml, write_jsonl


@pytest.fixture()
def config(tmp_path):
    """The tiny run, 4 steps with a checkpoint and validation every 2, as `tmp_path/tiny.yaml`."""
    return tiny_yaml(tmp_path, data={"path": str(write_jsonl(tmp_path / "tiny.jsonl", increments()))},
                     evaluation={"sample_prompts": ["1+1"]}, output={"run_name": "r"})


def test_train_then_chat_then_fuse(config, tmp_path, embedded_dir):
    r = lora_tui("--config", str(config), "train")
    assert r.returncode == 0, r.stderr
    assert "step 4/4: loss" in r.stdout and "BLAS" in r.stdout and "finished at step 4" in r.stdout
    adapter = tmp_path / "runs" / "r" / "adapter"
    assert (adapter / "adapters.safetensors").is_file()
    chat = lora_tui("--config", str(config), "chat", "--adapter", str(adapter), "--max-tokens", "8",
                    input="2+1\n/quit\n")
    assert chat.returncode == 0, chat.stderr and chat.stdout.strip()
    fused = lora_tui("--config", str(config), "fuse", "--adapter", str(adapter), "--out", str(tmp_path / "fused"))
    assert fused.returncode == 0, fused.stderr
    assert json.loads(fused.stdout)["same_greedy_output"] is True
    from mlx_lm import load
    model, tok = load(str(tmp_path / "fused"))  # a plain mlx-lm model folder
    assert model is not None


def test_sigint_saves_then_resume_finishes(config, tmp_path, embedded_dir):
    # no interval or best checkpoints: the one written must be the stop's own
    text = config.read_text().replace("iterations: 4", "iterations: 400").replace("every_steps: 2", "every_steps: 0")
    config.write_text(text)
    proc = subprocess.Popen(lora_tui_cmd("--config", config, "train"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/400"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "saving a checkpoint, then stopping" in err and "Traceback" not in err
    assert "checkpoint saved (stop)" in out
    saved = sorted((tmp_path / "runs" / "r" / "checkpoints").glob("step_*"))
    stopped_at = int(saved[-1].name.split("_")[1])
    assert stopped_at >= 3
    config.write_text(text.replace("iterations: 400", f"iterations: {stopped_at + 2}"))
    r = lora_tui("--config", str(config), "train", "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert f"from step {stopped_at}" in r.stdout and f"finished at step {stopped_at + 2}" in r.stdout


@pytest.mark.parametrize("edit,code,needle", [
    (lambda t: t.replace("tiny.jsonl", "missing.jsonl"), 3, "missing.jsonl: no such file"),
    (lambda t: t.replace("[q_proj, v_proj]", "[q_proj, qkv]"), 2, "lora.target_modules: qkv not found"),
    (lambda t: t.replace("rank: 4", "rank: 0"), 2, "lora.rank: 0 is out of range"),
])
def test_train_errors_are_one_line_with_exit_codes(config, edit, code, needle, embedded_dir):
    config.write_text(edit(config.read_text()))
    r = lora_tui("--config", str(config), "train")
    assert r.returncode == code, (r.returncode, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_resume_without_checkpoint(config, embedded_dir):
    r = lora_tui("--config", str(config), "train", "--resume", "latest")
    assert r.returncode == 2 and "no checkpoint to resume" in r.stderr
