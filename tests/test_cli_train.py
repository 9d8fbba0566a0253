"""Headless train / chat / fuse through the real `lora-tui` entry point, as a user runs them."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def tiny_yaml(tmp_path):
    data = tmp_path / "tiny.jsonl"
    with open(data, "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"prompt": f"{i}+1", "completion": str(i + 1)}) + "\n")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
lora: {{rank: 4, num_layers: 2, target_modules: [q_proj, v_proj]}}
training: {{iterations: 4, batch_size: 2, grad_accumulation: 1, warmup_steps: 1, learning_rate: 1.0e-3}}
data: {{path: {data}}}
checkpoints: {{every_steps: 2}}
evaluation: {{every_steps: 2, val_batches: 1, sample_prompts: ["1+1"], max_tokens: 4, heldout_path: ""}}
output: {{dir: {tmp_path / 'runs'}, run_name: r}}
""")
    return cfg


def lora_tui(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tui", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def test_train_then_chat_then_fuse(tiny_yaml, tmp_path, embedded_dir):
    r = lora_tui("--config", str(tiny_yaml), "train")
    assert r.returncode == 0, r.stderr
    assert "step 4/4: loss" in r.stdout and "BLAS" in r.stdout and "finished at step 4" in r.stdout
    adapter = tmp_path / "runs" / "r" / "adapter"
    assert (adapter / "adapters.safetensors").is_file()
    chat = lora_tui("--config", str(tiny_yaml), "chat", "--adapter", str(adapter), "--max-tokens", "8",
                    input="2+1\n/quit\n")
    assert chat.returncode == 0, chat.stderr and chat.stdout.strip()
    fused = lora_tui("--config", str(tiny_yaml), "fuse", "--adapter", str(adapter), "--out", str(tmp_path / "fused"))
    assert fused.returncode == 0, fused.stderr
    assert json.loads(fused.stdout)["same_greedy_output"] is True
    from mlx_lm import load
    model, tok = load(str(tmp_path / "fused"))  # a plain mlx-lm model folder
    assert model is not None


def test_sigint_saves_then_resume_finishes(tiny_yaml, tmp_path, embedded_dir):
    # no interval or best checkpoints: the one written must be the stop's own
    text = tiny_yaml.read_text().replace("iterations: 4", "iterations: 400").replace("every_steps: 2", "every_steps: 0")
    tiny_yaml.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "tui", "--config", str(tiny_yaml), "train"], cwd=ROOT,
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
    tiny_yaml.write_text(text.replace("iterations: 400", f"iterations: {stopped_at + 2}"))
    r = lora_tui("--config", str(tiny_yaml), "train", "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert f"from step {stopped_at}" in r.stdout and f"finished at step {stopped_at + 2}" in r.stdout


@pytest.mark.parametrize("edit,code,needle", [
    (lambda t: t.replace("tiny.jsonl", "missing.jsonl"), 3, "missing.jsonl: no such file"),
    (lambda t: t.replace("[q_proj, v_proj]", "[q_proj, qkv]"), 2, "lora.target_modules: qkv not found"),
    (lambda t: t.replace("rank: 4", "rank: 0"), 2, "lora.rank: 0 is out of range"),
])
def test_train_errors_are_one_line_with_exit_codes(tiny_yaml, edit, code, needle, embedded_dir):
    tiny_yaml.write_text(edit(tiny_yaml.read_text()))
    r = lora_tui("--config", str(tiny_yaml), "train")
    assert r.returncode == code, (r.returncode, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_resume_without_checkpoint(tiny_yaml, embedded_dir):
    r = lora_tui("--config", str(tiny_yaml), "train", "--resume", "latest")
    assert r.returncode == 2 and "no checkpoint to resume" in r.stderr
