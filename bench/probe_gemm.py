#!/usr/bin/env python3
"""The training step's matrix products, one shape at a time: MLX against PyTorch (cuBLAS) on the same GPU.

    source .g2/stage2.sh && python3 bench/probe_gemm.py --out $OUT
    ncu --clock-control none --metrics gpu__time_duration.sum --csv python3 bench/probe_gemm.py --reps 1

Issue 22 asks why MLX's bf16 GEMM runs ~15% below cuBLAS. MLX calls cublasLt with the top heuristic; PyTorch
calls cublas (or cublasLt) with its own. This times each product of a Mistral-7B layer at 4,096 tokens in the
layout the step uses: the frozen layers (x @ W.T forward, g @ W backward) and the rank-16 adapter's five
skinny products, whose speed decides what LoRA on all seven layers costs. Each framework runs in its own
process; MLX's calls are queued as one graph and timed over its evaluation, PyTorch's with CUDA events.
Under ncu (--reps 1) the kernel names show which algorithm each side picked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_gpu import BATCH, SEQ, SHAPE  # noqa: E402  (BENCH_GPU_SMOKE=1: the tiny shape, to try it on a CPU)
from probe_gpu import _timed  # noqa: E402

T, D, MLP, R = BATCH * SEQ, SHAPE["hidden"], SHAPE["mlp"], 16
KV = SHAPE["kv_heads"] * SHAPE["head_dim"]

# name: (M, K, N, a_transposed, b_transposed): out[M, N] = op(a) @ op(b), as the step lays the operands out.
SHAPES = {
    "square 8192": (8192, 8192, 8192, False, False),
    "q fwd x@W.T": (T, D, D, False, True),
    "kv fwd x@W.T": (T, D, KV, False, True),
    "gate+up fwd x@W.T": (T, D, 2 * MLP, False, True),
    "down fwd x@W.T": (T, MLP, D, False, True),
    "q bwd g@W": (T, D, D, False, False),
    "gate+up bwd g@W": (T, 2 * MLP, D, False, False),
    "down bwd g@W": (T, D, MLP, False, False),
    "lora x@A": (T, D, R, False, False),
    "lora t@B": (T, R, D, False, False),
    "lora dA x.T@gB": (D, T, R, True, False),
    "lora dB t.T@g": (R, T, D, True, False),
    "lora gB g@B.T": (T, D, R, False, True),
    "lora dx gB@A.T": (T, R, D, False, True),
    "down lora x@A": (T, MLP, R, False, False),
    "down lora dA x.T@gB": (MLP, T, R, True, False),
    "down lora dx gB@A.T": (T, R, MLP, False, True),
}


def operands(M, K, N, ta, tb):
    """Shapes of the stored a and b such that op(a) is (M, K) and op(b) is (K, N)."""
    return ((K, M) if ta else (M, K)), ((N, K) if tb else (K, N))


def run_mlx(reps: int) -> dict:
    import mlx.core as mx
    out = {}
    for name, (M, K, N, ta, tb) in SHAPES.items():
        sa, sb = operands(M, K, N, ta, tb)
        a = mx.random.normal(sa).astype(mx.bfloat16)
        b = mx.random.normal(sb).astype(mx.bfloat16)
        mx.eval(a, b)
        out[name] = _timed(lambda: (a.T if ta else a) @ (b.T if tb else b), n=reps)["ms"]
    return out


def run_torch(reps: int) -> dict:
    import torch
    out = {}
    for name, (M, K, N, ta, tb) in SHAPES.items():
        sa, sb = operands(M, K, N, ta, tb)
        a = torch.randn(sa, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(sb, device="cuda", dtype=torch.bfloat16)

        def f():
            return (a.t() if ta else a) @ (b.t() if tb else b)

        f()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            f()
        end.record()
        torch.cuda.synchronize()
        out[name] = start.elapsed_time(end) / reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--side", choices=("mlx", "torch"))
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.side:
        print("RESULT " + json.dumps(run_mlx(a.reps) if a.side == "mlx" else run_torch(a.reps)), flush=True)
        return
    res = {}
    for side in ("mlx", "torch"):
        p = subprocess.run([sys.executable, __file__, "--side", side, "--reps", str(a.reps)], capture_output=True,
                           text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{side} failed: {(p.stderr or p.stdout)[-600:]}")
            return
        res[side] = json.loads(line[7:])
    print(f"{'product':<22}{'M x K x N':>22}{'MLX ms':>9}{'torch ms':>9}{'MLX speed':>10}{'MLX TFLOP/s':>12}"
          f"{'torch TFLOP/s':>14}")
    rows = []
    for name, (M, K, N, _, _) in SHAPES.items():
        m, t = res["mlx"][name], res["torch"][name]
        fl = 2 * M * K * N
        rows.append(dict(product=name, M=M, K=K, N=N, mlx_ms=m, torch_ms=t))
        print(f"{name:<22}{f'{M}x{K}x{N}':>22}{m:9.3f}{t:9.3f}{t / m:10.2f}{fl / m / 1e9:12.0f}{fl / t / 1e9:14.0f}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "probe_gemm.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
