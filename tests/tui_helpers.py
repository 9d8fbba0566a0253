"""Helpers for Pilot tests: wait on the real engine thread without sleeping blindly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from engine.config.schema import Config


async def wait_for(pilot, condition, timeout: float = 120.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def shown(screen, selector: str) -> str:
    """The text a widget shows now (what a person reads there)."""
    return str(screen.query_one(selector).render())


def train_state(screen) -> str:
    """The Train screen's state label: idle, starting, running, paused, following, done, ..."""
    return shown(screen, "#train-state")


def answering(chat) -> bool:
    """An answer is on its way: the chat's Send button is off until it ends."""
    return chat.query_one("#chat-send").disabled


def tiny_dataset(path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(1)
    with open(path, "w") as fh:
        for i in range(n):
            a, b = (int(x) for x in rng.integers(1, 50, 2))
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                              {"role": "assistant", "content": str(a + b)}],
                                 "label": "desirable"}) + "\n")
    return path


def tiny_config(tmp_path: Path, iterations: int = 4) -> Config:
    cfg = Config()
    cfg.data.path = str(tiny_dataset(tmp_path / "tiny.jsonl"))
    cfg.lora.rank, cfg.lora.num_layers = 4, 2
    t = cfg.training
    t.iterations, t.batch_size, t.grad_accumulation, t.warmup_steps, t.learning_rate = iterations, 2, 1, 1, 1e-3
    cfg.evaluation.every_steps, cfg.evaluation.val_batches = 2, 1
    cfg.evaluation.sample_prompts, cfg.evaluation.max_tokens = [], 4
    cfg.checkpoints.every_steps = 2
    cfg.output.dir, cfg.output.run_name = str(tmp_path / "runs"), "tui"
    return cfg

