#!/usr/bin/env python3
"""What the end of an optimizer step costs: scaling the gradients by the token count, clipping and AdamW, over
the LoRA parameters of a Mistral-7B-shaped model (32 layers, rank 16), per parameter array as the engine does
it (engine/train/step.py) against one flat array for all of them.

    python3 bench/probe_update.py [--targets all|qv] [--steps 30] [--out FILE]

Per array: MLX's compiled update still runs a few kernels for each of the 448 arrays (all seven layers) or 128
(q/v), each a few microseconds, plus the host's work to build them. Flat: engine/train/flat_update.py, the
gradients concatenated into one vector (one copy kernel each, as the micro step does it), then the scale, the
norm, the clip and AdamW over the vector, and the parameters written back as views into the result. Prints ms
per step for both and how far their results differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

LAYERS, D, KV, MLP, RANK = 32, 4096, 1024, 14336, 16
PROJ = {"q_proj": (D, D), "k_proj": (D, KV), "v_proj": (D, KV), "o_proj": (D, D), "gate_proj": (D, MLP),
        "up_proj": (D, MLP), "down_proj": (MLP, D)}


def shapes(targets: str) -> dict[str, tuple[int, ...]]:
    names = ["q_proj", "v_proj"] if targets == "qv" else list(PROJ)
    out = {}
    for layer in range(LAYERS):
        for name in names:
            n_in, n_out = PROJ[name]
            out[f"layers.{layer}.{name}.lora_a"] = (n_in, RANK)
            out[f"layers.{layer}.{name}.lora_b"] = (RANK, n_out)
    return out


def as_module(flat: dict):
    """An nn.Module holding `flat` ({"layers.0.q_proj.lora_a": array, ...}) as its parameters."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    module = nn.Module()
    for key, value in tree_unflatten(list(flat.items())).items():
        setattr(module, key, value)
    return module


def run(targets: str, steps: int) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    from engine.train.flat_update import FlatUpdate, ParameterVector
    from engine.train.step import build_update, clip_gradients

    mx.random.seed(0)
    spec = shapes(targets)
    start = {k: mx.random.normal(s) * 0.01 for k, s in spec.items()}
    grads = [{k: mx.random.normal(s) for k, s in spec.items()} for _ in range(3)]
    mx.eval(start, grads)
    denom = mx.array(4096.0)
    out = {"arrays": len(spec), "parameters": sum(v.size for v in start.values())}

    # per array: what the engine does now
    model = as_module(start)
    opt = optim.AdamW(learning_rate=1e-4, bias_correction=True)
    opt.init(model.trainable_parameters())
    update = build_update(model, opt)

    nested = [tree_unflatten(list(g.items())) for g in grads]

    def tree_step(i):
        g = tree_map(lambda x: x / denom, nested[i])
        g, norm = clip_gradients(g, 1.0)
        update(g)
        return norm

    # flat: engine/train/flat_update.py, the gradients concatenated as the micro step does it
    flat_model = as_module(start)
    fopt = optim.AdamW(learning_rate=1e-4, bias_correction=True)
    vector = ParameterVector(flat_model.trainable_parameters())
    flat_update = FlatUpdate(flat_model, fopt, vector)

    def flat_step(i):
        g, norm = clip_gradients(vector.flatten(nested[i]) / denom, 1.0)
        flat_update(g)
        mx.eval(flat_model.trainable_parameters(), fopt.state)  # as build_update's apply waits
        return norm

    for name, step, params in (("per_array", tree_step, lambda: dict(tree_flatten(model.parameters()))),
                               ("flat", flat_step, lambda: dict(tree_flatten(flat_model.parameters())))):
        for i in range(3):  # warm-up: compile and allocate
            step(i % 3)
        mx.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            step(i % 3)
        mx.synchronize()
        out[f"{name}_ms"] = (time.perf_counter() - t0) / steps * 1e3
        out[f"{name}_result"] = params()
    a, b = out.pop("per_array_result"), out.pop("flat_result")
    diff = max(mx.abs(a[k] - b[k]).max().item() for k in spec)
    scale = max(mx.abs(a[k]).max().item() for k in spec)
    out["max_abs_difference"], out["max_abs_parameter"] = diff, scale
    out["device"] = str(mx.default_device())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="all", choices=["all", "qv"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = run(args.targets, args.steps)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
