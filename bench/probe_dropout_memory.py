#!/usr/bin/env python3
"""What dropout keeps between the forward and backward passes: peak memory of a chain of LoRA layers.

    scripts/run python bench/probe_dropout_memory.py      # ~1 min on this CPU

Each case runs in its own process: 20 frozen 576 x 576 Linear layers with r16 adapters (engine/model/lean.py's
branch), tanh between them, 8,192 tokens, value_and_grad with and without `mx.compile`, dropout 0 and 0.05, the
mask applied as lean.apply_mask does (`where`) and as it did before (`mask * x`). Prints the peak in bytes per
token and layer; a boolean mask is 576 of them, a float32 copy 2,304 (bench/RESULTS.md, issue 22, fifth session).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENS, WIDTH, LAYERS = 8192, 576, 20

CASE = """
import json, sys
import engine
import mlx.core as mx, mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear
from engine.model import lean
drop, compiled, form = {drop}, {compiled}, {form!r}
if form == "product":  # the form before: the mask promoted to x's dtype
    lean.apply_mask = lambda mask, x, keep: (mask * x) * (1 / keep)
layers = [LoRALinear.from_base(nn.Linear({width}, {width}, bias=False), r=16, dropout=drop, scale=2.0)
          for _ in range({layers})]
model = nn.Sequential(*[nn.Sequential(layer, nn.Tanh()) for layer in layers])
model.freeze()
for layer in layers:
    layer.unfreeze(keys=["lora_a", "lora_b"])
lean.lean_autograd(model)
model.train()
x = mx.random.normal(({tokens}, {width}))

def loss(params, x):
    model.update(params)
    return (model(x) ** 2).sum()

step = mx.value_and_grad(loss)
step = mx.compile(step) if compiled else step
params = model.trainable_parameters()  # taken once: inside the step the model holds traced arrays
for _ in range(2):
    mx.clear_cache(); mx.reset_peak_memory()
    value, grads = step(params, x)
    mx.eval(value, grads)
print(json.dumps({{"peak": mx.get_peak_memory()}}))
"""


def main() -> None:
    rows = []
    for compiled in (True, False):
        for drop, form in ((0.0, "where"), (0.05, "product"), (0.05, "where")):
            code = CASE.format(drop=drop, compiled=compiled, form=form, width=WIDTH, layers=LAYERS, tokens=TOKENS)
            r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
            if r.returncode:
                sys.exit(r.stderr[-2000:])
            peak = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
            rows.append({"compiled": compiled, "dropout": drop, "mask": form, "peak_mb": round(peak / 1e6, 1),
                         "bytes_per_token_layer": round(peak / TOKENS / LAYERS)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
