"""What model.dtype and model.quantized_base cost a training step on this CPU (bench/RESULTS.md, twenty-second
session), and how far MLX's CPU quantized matmul in bf16 is from float32.

  scripts/run python bench/probe_cpu_dtype.py [DTYPE BASE]   (default: all four pairs, each in its own process)
  scripts/run python bench/probe_cpu_dtype.py matmul

A step: the embedded model, LoRA r8 on 4 blocks' q/v, 2 x 64 tokens, one value_and_grad and eval; three steps, the
last printed (bf16 on a kept 4-bit base takes minutes a step: only its first is waited for).
"""

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401  (MKL before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

PAIRS = [("float32", "auto"), ("bfloat16", "auto"), ("float32", "keep"), ("bfloat16", "keep")]


def step_times(dtype: str, base: str) -> None:
    from engine.config.schema import Config
    from engine.model.adapters import apply_lora
    from engine.model.loading import load_model
    from engine.train.losses import loss_inputs, masked_loss
    cfg = Config()
    cfg.lora.rank, cfg.lora.num_layers = 8, 4
    cfg.model.dtype, cfg.model.quantized_base = dtype, base
    model, _, info = load_model(cfg.model)
    apply_lora(model, cfg.lora)
    model.train()
    tokens = np.random.default_rng(0).integers(0, 40000, (2, 65)).astype(np.int32)
    batch = loss_inputs(tokens[:, :-1], tokens[:, 1:], np.ones((2, 64), bool))
    for i in range(1 if (dtype, base) == ("bfloat16", "keep") else 3):
        t = time.perf_counter()
        (loss, _), grads = nn.value_and_grad(model, masked_loss)(model, *batch)
        mx.eval(loss, grads)
        seconds = time.perf_counter() - t
    print(f"{dtype} / {base} (quantized kept: {info.quantized}): step {i + 1} {seconds:.2f} s", flush=True)


def matmul() -> None:
    mx.random.seed(0)
    w, x = mx.random.normal((1536, 576)), mx.random.normal((128, 576))
    wq, scales, biases = mx.quantize(w.astype(mx.bfloat16), group_size=32, bits=4)
    f32 = [a.astype(mx.float32) for a in (x, scales, biases)]
    exact = np.array(mx.quantized_matmul(f32[0], wq, f32[1], f32[2], transpose=True, group_size=32, bits=4))
    for name, dtype in (("float32", mx.float32), ("bfloat16", mx.bfloat16)):
        args = [a.astype(dtype) for a in (x, scales, biases)]
        mx.eval(args)
        t = time.perf_counter()
        y = mx.quantized_matmul(args[0], wq, args[1], args[2], transpose=True, group_size=32, bits=4)
        mx.eval(y)
        seconds = time.perf_counter() - t
        dense = args[0] @ mx.dequantize(wq, args[1], args[2], group_size=32, bits=4).T
        err = lambda a: float(np.abs(np.array(a.astype(mx.float32)) - exact).max())  # noqa: E731
        print(f"{name}: quantized_matmul 128x576x1536 {seconds:.3f} s, max error {err(y):.3f} "
              f"(dense matmul {err(dense):.3f}; largest value {float(np.abs(exact).max()):.1f})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["matmul"]:
        matmul()
    elif len(sys.argv) == 3:
        step_times(*sys.argv[1:3])
    else:
        for pair in PAIRS:
            subprocess.run([sys.executable, __file__, *pair], timeout=600)
