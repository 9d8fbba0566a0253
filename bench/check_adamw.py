"""Our AdamW (engine.train.schedule.build_optimizer with the default config, through the compiled update training
uses) against torch.optim.AdamW itself, on the same parameters and gradients, and the size of MLX's
uncorrected steps against the corrected ones.

torch is not a dependency of lora-tui: this runs in a venv of its own (bench/.venv-torch, gitignored):

    uv venv bench/.venv-torch
    uv pip install --python bench/.venv-torch "torch==2.13.0+cpu" numpy "mlx[cpu]==0.32.4" pyyaml psutil
    bench/.venv-torch/bin/python bench/check_adamw.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402,F401  (the BLAS preload, before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.config.schema import Config  # noqa: E402
from engine.train.schedule import build_optimizer, build_schedule  # noqa: E402
from engine.train.step import build_update  # noqa: E402

SHAPES = {"lora_a": (576, 16), "lora_b": (16, 576)}  # one SmolLM2 q_proj adapter, rank 16


class Params(nn.Module):
    def __init__(self, values: dict[str, np.ndarray]):
        super().__init__()
        for name, value in values.items():
            setattr(self, name, mx.array(value))


def gradients(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (rng.normal(size=s) * rng.uniform(0.01, 1.0)).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(steps)]


def run_mlx(cfg: Config, start, grads, total_steps: int) -> list[dict[str, np.ndarray]]:
    schedule = build_schedule(cfg, total_steps)
    model = Params(start)
    optimizer = build_optimizer(cfg, schedule)
    optimizer.init(model.trainable_parameters())
    update, out = build_update(model, optimizer), []
    for g in grads:
        update({k: mx.array(v) for k, v in g.items()})
        out.append({k: np.array(v) for k, v in model.trainable_parameters().items()})
    return out


def run_torch(cfg: Config, start, grads, total_steps: int) -> list[dict[str, np.ndarray]]:
    schedule = build_schedule(cfg, total_steps)  # the same learning rate at each step
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
    t = cfg.training
    optimizer = torch.optim.AdamW(params.values(), lr=t.learning_rate, weight_decay=t.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    out = []
    for step, g in enumerate(grads):
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(mx.array(step)))
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        optimizer.step()
        out.append({k: p.detach().numpy().copy() for k, p in params.items()})
    return out


def step_sizes(cfg: Config, start, grads) -> np.ndarray:
    """Mean |update| per step, without weight decay (so only Adam's step is measured)."""
    cfg.training.weight_decay = 0.0
    after = run_mlx(cfg, start, grads, len(grads))
    before = [start] + after[:-1]
    return np.array([np.mean([np.abs(a[k] - b[k]).mean() for k in SHAPES]) for a, b in zip(after, before)])


def main() -> None:
    rng = np.random.default_rng(1)
    start = {k: (rng.normal(size=s) * 0.02).astype(np.float32) for k, s in SHAPES.items()}
    cfg = Config()  # the defaults: lr 1e-4, warmup 10, cosine, weight decay 0.01, bias correction on
    print(f"torch {torch.__version__}, mlx {mx.__version__}, numpy {np.__version__}; "
          f"adam_bias_correction={cfg.training.adam_bias_correction}")
    grads = gradients(10)
    ours, theirs = run_mlx(cfg, start, grads, 100), run_torch(cfg, start, grads, 100)
    print("step  max |ours - torch|  max |update| (torch)")
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        prev = start if step == 1 else theirs[step - 2]
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in SHAPES)
        update = max(float(np.abs(b[k] - prev[k]).max()) for k in SHAPES)
        print(f"{step:4d}  {diff:18.3e}  {update:.3e}")

    many = gradients(1000, seed=2)
    flat = Config()
    flat.training.lr_schedule, flat.training.warmup_steps, flat.training.learning_rate = "constant", 0, 1e-6
    corrected = step_sizes(flat, start, many)
    flat.training.adam_bias_correction = False
    uncorrected = step_sizes(flat, start, many)
    ratio = uncorrected / corrected
    print("uncorrected (MLX's default) / corrected step size at a constant learning rate: " +
          ", ".join(f"step {s}: x{ratio[s - 1]:.2f}" for s in (1, 2, 5, 10, 100, 1000)))
    # With the default schedule (warmup over 10 steps) the first ten updates add up to:
    schedule = build_schedule(Config(), 100)
    lrs = np.array([float(schedule(mx.array(i))) for i in range(10)])
    print(f"sum of the first 10 updates with the default warmup, uncorrected / corrected: "
          f"x{(lrs * ratio[:10]).sum() / lrs.sum():.2f}")


if __name__ == "__main__":
    main()
