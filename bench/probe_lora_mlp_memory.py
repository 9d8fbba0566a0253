#!/usr/bin/env python3
"""A checkpointed step with LoRA on all seven layers: the adapted MLP's own recompute (checkpointed_lora_mlp.py)
against autograd's, peak memory and step time on this machine, the embedded model in float32.

    scripts/run python bench/probe_lora_mlp_memory.py [--sizes 4x512 2x1024] [--steps 3]   # ~2 min on this CPU

Each case runs in its own process (no other arrays count towards the peak): the engine's real micro-step and
update (build_micro_step, build_update) under checkpointed_layers, LoRA r8 on all seven layers, dropout 0.05,
loss on every position. Prints the peak above the weights and the mean of the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASE = """
import json, time
import numpy as np
import engine
import mlx.core as mx, mlx.optimizers as optim
from mlx.utils import tree_flatten
from engine.config.schema import Config
from engine.model import checkpointed_lora_mlp, checkpointed_mlp
from engine.model.adapters import apply_lora
from engine.model.loading import load_model
from engine.train.losses import loss_inputs
from engine.train.step import accumulate_gradients, build_micro_step, build_update, checkpointed_layers
checkpointed_lora_mlp.CHECKPOINTED_LORA_MLP = {on}
checkpointed_mlp.CHUNKS = {chunks}
cfg = Config()
cfg.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
cfg.lora.num_layers, cfg.lora.dropout = -1, 0.05
model, _, _ = load_model(cfg.model)
apply_lora(model, cfg.lora)
checkpointing = checkpointed_layers(model, True)
checkpointing.__enter__()
opt = optim.AdamW(learning_rate=1e-4)
step, update = build_micro_step(model, opt), build_update(model, opt)
weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
tokens = np.random.default_rng(0).integers(0, 40000, ({batch}, {length} + 1)).astype(np.int32)
inputs = loss_inputs(tokens[:, :-1], tokens[:, 1:], np.ones(({batch}, {length}), bool))
mx.random.seed(0)  # the same dropout masks in both cases
mx.eval(model.parameters()); mx.clear_cache(); mx.reset_peak_memory()
times, losses = [], []
for _ in range({steps}):
    t0 = time.perf_counter()
    grads, loss = accumulate_gradients(step, iter([inputs]))
    update(grads)
    mx.eval(loss, model.parameters(), opt.state)
    times.append(time.perf_counter() - t0); losses.append(loss.item())
print(json.dumps({{"above_weights_gb": (mx.get_peak_memory() - weights) / 1e9,
                  "step_s": sum(times[1:]) / len(times[1:]), "losses": losses}}))
"""


def run_case(on: bool, batch: int, length: int, steps: int, chunks: int) -> dict:
    code = CASE.format(on=on, batch=batch, length=length, steps=steps, chunks=chunks)
    r = subprocess.run([str(ROOT / "scripts" / "run"), "python", "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"probe_lora_mlp_memory: the case failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["4x512", "2x1024"], help="batch x length")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunks", type=int, default=2, help="checkpointed_mlp.CHUNKS")
    args = p.parse_args()
    for size in args.sizes:
        batch, length = (int(v) for v in size.split("x"))
        rows = {on: run_case(on, batch, length, args.steps, args.chunks) for on in (False, True)}
        off, on = rows[False], rows[True]
        print(f"{size}: peak above the weights {off['above_weights_gb']:.3f} -> {on['above_weights_gb']:.3f} GB, "
              f"step {off['step_s']:.2f} -> {on['step_s']:.2f} s; losses {off['losses']} / {on['losses']}")


if __name__ == "__main__":
    main()
