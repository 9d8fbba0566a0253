"""The learning-rate schedule (warmup, then cosine, linear or constant) and the AdamW optimizer."""

from __future__ import annotations

from engine.config.schema import Config


def build_schedule(cfg: Config, total_steps: int):
    import mlx.core as mx
    import mlx.optimizers as optim
    t = cfg.training
    lr, warm = t.learning_rate, min(t.warmup_steps, max(total_steps - 1, 0))
    end = lr * t.min_lr_ratio
    decay_steps = max(total_steps - warm, 1)
    if t.lr_schedule == "cosine":
        decay = optim.cosine_decay(lr, decay_steps, end)
    elif t.lr_schedule == "linear":
        decay = optim.linear_schedule(lr, end, decay_steps)
    else:
        decay = lambda step: mx.array(lr, dtype=mx.float32)  # noqa: E731  (the optimizer casts it)
    if warm == 0:
        return decay
    # Start at lr/(warm+1), not 0: a first step at lr 0 would be wasted.
    return optim.join_schedules([optim.linear_schedule(lr / (warm + 1), lr, warm), decay], [warm])


def step_rates(schedule, total_steps: int):
    """Every step's learning rate (float32, for the log), computed once before training. Read step by step, each
    would be an eval, and MLX holds any eval back while it is over its memory limit: with the next step queued
    ahead on a GPU, until the step in flight is nearly done. (Measured, the run's gap to the bench step was mostly
    elsewhere: batch_feed.py; bench/RESULTS.md, issue 22, sixteenth and seventeenth sessions.)"""
    import mlx.core as mx
    import numpy as np
    with mx.stream(mx.cpu):  # one small graph on the CPU, whatever the device
        return np.array(mx.broadcast_to(schedule(mx.arange(total_steps)), (total_steps,)))


def build_optimizer(cfg: Config, schedule):
    """AdamW as PyTorch and Hugging Face define it (by default): MLX's own default skips the bias
    correction, which makes the first steps several times larger at the same learning rate (x3.2 at
    step 1, x6.5 at step 10; bench/check_adamw.py)."""
    import mlx.optimizers as optim
    t = cfg.training
    return optim.AdamW(learning_rate=schedule, weight_decay=t.weight_decay, bias_correction=t.adam_bias_correction)
