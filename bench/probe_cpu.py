#!/usr/bin/env python3
"""Where the CPU training step's time goes: the embedded model in float32, one part switched at a time.

    scripts/run python bench/probe_cpu.py [--batch 4] [--seq 320] [--trained 0.4] [--thread] [--only base noattn ...]

Each probe runs in its own process (its own compile cache and BLAS threads) and times the engine's
compiled micro-step (build_micro_step: value_and_grad of the masked loss, LoRA r16 on q/v of every block,
no dropout, as bench_cpu.py trains) on one fixed batch of random tokens. CPU seconds over wall seconds
say how much of the step used both cores. Probes:
  base       the engine's step            nocompile  without mx.compile     stock   without engine/model/lean.py
  noattn     attention output = queries   nomlp      MLP = identity        nonorm  RMSNorm = identity
  norope     RoPE = identity              nohead     loss on the mean hidden state (no vocabulary projection)
  wholehead  the head's logits at once, kept for the backward pass (losses.CE_CHUNK_BYTES = 0)
  dropout    LoRA dropout 0.05 (the config's default)
  matmuls    only the step's matrix products (forward, and backward to the inputs) at the same shapes
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBES = ["base", "ftz", "nocompile", "stock", "noattn", "nomlp", "nonorm", "norope", "nohead", "wholehead", "dropout",
          "matmuls"]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def flush_denormals() -> None:
    """FTZ + DAZ in this thread's MXCSR; threads created later (MLX's stream thread, MKL's) inherit it."""
    import ctypes
    libm = ctypes.CDLL("libm.so.6")
    env = ctypes.create_string_buffer(64)
    libm.fegetenv(env)
    mxcsr = int.from_bytes(env.raw[28:32], "little") | 0x8040
    env[28:32] = mxcsr.to_bytes(4, "little")
    libm.fesetenv(env)


def build(probe: str):
    sys.path.insert(0, str(ROOT))
    if probe == "ftz":
        flush_denormals()
    import engine  # noqa: F401  (preloads MKL before mlx)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.models import llama

    from engine.config.schema import Config
    from engine.model.adapters import apply_lora
    from engine.model.loading import load_model
    cfg = Config()
    model, _, _ = load_model(cfg.model, lambda *a: None)
    lora = cfg.lora.__class__(**{**cfg.lora.__dict__, "dropout": 0.05 if probe == "dropout" else 0.0})
    apply_lora(model, lora, lean=probe != "stock")
    if probe == "noattn":
        llama.scaled_dot_product_attention = lambda q, k, v, cache, scale, mask, sinks=None: q
    if probe == "nomlp":
        for layer in model.model.layers:
            layer.mlp = nn.Identity()
    if probe == "nonorm":
        for layer in model.model.layers:
            layer.input_layernorm = nn.Identity()
            layer.post_attention_layernorm = nn.Identity()
        model.model.norm = nn.Identity()
    if probe == "norope":
        for layer in model.model.layers:
            layer.self_attn.rope = lambda x, offset=0: x
    return mx, model, optim.AdamW(learning_rate=1e-4)


def run_probe(probe: str, batch: int, seq: int, trained: float, steps: int) -> dict:
    mx, model, optimizer = build(probe)
    from engine.train import losses
    from engine.train.step import build_micro_step
    import mlx.nn as nn
    mx.random.seed(0)
    vocab = model.args.vocab_size
    inputs = mx.random.randint(0, vocab, (batch, seq))
    targets = mx.random.randint(0, vocab, (batch, seq))
    per_row = int(seq * trained)
    positions = mx.array([r * seq + seq - per_row + i for r in range(batch) for i in range(per_row)])
    weights = mx.ones(positions.shape)
    if probe == "nohead":
        losses.token_losses = lambda model, inputs, targets, positions, *_: \
            model.model(inputs).mean(-1).reshape(-1)[positions]
    if probe == "wholehead":  # the head's logits all at once, kept for the backward pass (losses.CE_CHUNK_BYTES)
        losses.CE_CHUNK_BYTES = 0
    if probe == "matmuls":
        step = matmul_step(mx, model, batch * seq, batch * per_row)
    elif probe == "nocompile":
        loss_and_grad = nn.value_and_grad(model, losses.masked_loss)
        step = lambda *a: loss_and_grad(model, *a)  # noqa: E731
    else:
        step = build_micro_step(model, optimizer)
    args = (inputs, targets, positions, weights)
    for _ in range(2):
        mx.eval(step(*args))
    mx.reset_peak_memory()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
        mx.eval(step(*args))
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return dict(probe=probe, step_s=round(wall / steps, 4), cores_used=round(cpu / wall, 2),
                tokens_per_s=round(batch * seq * steps / wall, 1), peak_gb=round(mx.get_peak_memory() / 1e9, 3))


def matmul_step(mx, model, tokens: int, trained: int):
    """The step's matrix products alone: per block q, k, v, o, gate, up, down forward, and the same
    products backward to the inputs; the head on the trained rows forward and backward."""
    args = model.args
    d, m = args.hidden_size, args.intermediate_size
    kv = args.num_key_value_heads * (d // args.num_attention_heads)
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (m, d), (m, d), (d, m)]
    ws = [mx.random.normal(s) * 0.02 for s in shapes]
    head = mx.random.normal((args.vocab_size, d)) * 0.02
    x, xm = mx.random.normal((tokens, d)), mx.random.normal((tokens, m))
    xh = mx.random.normal((trained, d))
    gh = mx.random.normal((trained, args.vocab_size))
    mx.eval(ws, head, x, xm, xh, gh)

    def step(*_):
        outs = []
        for _ in range(args.num_hidden_layers):
            for w in ws:
                inp = xm if w.shape[1] == m else x
                y = inp @ w.T
                outs.append(y.sum())
                outs.append((y @ w).sum())  # backward to the input: same FLOPs
        outs.append((xh @ head.T).sum())
        outs.append((gh @ head).sum())
        return sum(outs)
    return step


def run_on_thread(a) -> dict:
    """run_probe on a thread of its own (the TUI's engine thread), which releases its MLX streams at the end."""
    import threading
    box = []

    def target():
        from engine import release_mlx_streams
        try:
            box.append(run_probe(a.probe, a.batch, a.seq, a.trained, a.steps))
        finally:
            release_mlx_streams()
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return box[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=320)
    ap.add_argument("--trained", type=float, default=0.4, help="share of each row's tokens the loss sees")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", nargs="+", default=PROBES)
    ap.add_argument("--thread", action="store_true", help="run each probe on a worker thread, as the app trains")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.probe:
        print(json.dumps(run_on_thread(a) if a.thread else run_probe(a.probe, a.batch, a.seq, a.trained, a.steps)))
        return
    rows = []
    for probe in a.only:
        cmd = [sys.executable, __file__, "--probe", probe, "--batch", str(a.batch), "--seq", str(a.seq),
               "--trained", str(a.trained), "--steps", str(a.steps), *(["--thread"] if a.thread else [])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else json.dumps(
            dict(probe=probe, error=out.stderr.strip().splitlines()[-1:]))
        rows.append(json.loads(line))
        print(line, flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(batch=a.batch, seq=a.seq, trained=a.trained, rows=rows), indent=1))


if __name__ == "__main__":
    main()
