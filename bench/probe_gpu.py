#!/usr/bin/env python3
"""Where the GPU step's memory and time go: the bench_gpu.py model at a few depths, one part switched at a time.

    source .g2/stage2.sh && python3 bench/probe_gpu.py --out $OUT

Every probe runs in its own process. Per-layer activation memory is the slope of (peak - weights) between
two depths, so fixed costs (logits, optimizer, allocator slack) drop out. Probes:
  sdpa            attention alone at the bench shape under value_and_grad: MLX's default, force_fused, and
                  the plain matmul-softmax-matmul, peak memory above the inputs
  <variant>@<L>   the engine's step (compiled micro_step) on an L-layer model, with one thing changed:
                  base (the engine's step, lean autograd included), stock (plain autograd), nocompile, nodropout, noattn (attention output = queries), nomlp (MLP = identity),
                  fused (force_fused attention), 4bit (quantized forward, dequantized backward), 4bit-fwd
                  (dequantize in the forward pass too, custom VJP), 4bit-dep (the same, each dequantize
                  ordered after its input with mx.depends: what engine/qlora.py does)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_gpu import BATCH, SEQ, SHAPE, build_model, random_batch  # noqa: E402


def probe_sdpa() -> dict:
    import mlx.core as mx
    B, H, KV, L, D = BATCH, SHAPE["heads"], SHAPE["kv_heads"], SEQ, SHAPE["head_dim"]
    q = mx.random.normal((B, H, L, D)).astype(mx.bfloat16)
    k = mx.random.normal((B, KV, L, D)).astype(mx.bfloat16)
    v = mx.random.normal((B, KV, L, D)).astype(mx.bfloat16)
    w = mx.random.normal((B, H, L, D)).astype(mx.bfloat16)
    mx.eval(q, k, v, w)
    out = {}

    def plain(q, k, v):
        rep = H // KV
        kk, vv = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
        s = (q * D ** -0.5) @ kk.swapaxes(-1, -2)
        s = s + mx.triu(mx.full((L, L), -mx.inf, dtype=s.dtype), k=1)
        return mx.softmax(s.astype(mx.float32), axis=-1).astype(q.dtype) @ vv

    for name, fn in (("default", lambda q, k, v: mx.fast.scaled_dot_product_attention(
                         q, k, v, scale=D ** -0.5, mask="causal")),
                     ("force_fused", lambda q, k, v: mx.fast.scaled_dot_product_attention(
                         q, k, v, scale=D ** -0.5, mask="causal", force_fused=True)),
                     ("plain", plain)):
        try:
            g = mx.value_and_grad(lambda q, k, v: (fn(q, k, v) * w).astype(mx.float32).sum(), argnums=(0, 1, 2))
            base = mx.get_active_memory()
            for _ in range(2):
                mx.eval(g(q, k, v))
            mx.synchronize()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            for _ in range(5):
                mx.eval(g(q, k, v))
            mx.synchronize()
            out[name] = dict(ms=(time.perf_counter() - t0) / 5 * 1e3, extra_gb=(mx.get_peak_memory() - base) / 1e9)
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": str(e)[:300]}
    return out


def _dequantizing_forward(group_size, bits):
    import mlx.core as mx

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ mx.dequantize(w, scales, biases, group_size, bits).T.astype(x.dtype)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        dense = mx.dequantize(w, scales, biases, group_size, bits).astype(cotangent.dtype)
        return cotangent @ dense, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


def probe_step(variant: str, layers: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.models import llama

    from engine.evaluate import masked_loss
    from engine.train import accumulate_gradients, apply_update, build_micro_step

    if variant == "noattn":
        llama.scaled_dot_product_attention = lambda q, k, v, cache=None, scale=1.0, mask=None: q
    if variant == "fused":
        llama.scaled_dot_product_attention = lambda q, k, v, cache=None, scale=1.0, mask=None: \
            mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, force_fused=True)
    if variant == "nomlp":
        llama.MLP.__call__ = lambda self, x: x

    model = build_model(layers, 4 if "4bit" in variant else None, dropout=0.0 if variant == "nodropout" else 0.05,
                        dense_forward=variant == "4bit-dep", lean=variant != "stock")
    if variant == "4bit-fwd":  # dense forward without mx.depends: what engine/qlora.py did before it
        from engine.qlora import DequantizingLinear
        for _, m in model.named_modules():
            if isinstance(m, DequantizingLinear):
                m._matmul = _dequantizing_forward(m.group_size, m.bits)
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(model.trainable_parameters())
    weights = mx.get_active_memory()
    batch = random_batch()
    if variant == "nocompile":
        loss_and_grad = nn.value_and_grad(model, masked_loss)

        def micro_step(*a):
            (s, n), g = loss_and_grad(model, *a)
            return s, n, g
    else:
        micro_step = build_micro_step(model, optimizer)  # compiled lazily, at the first call

    def step():
        grads, loss = accumulate_gradients(micro_step, [batch])
        apply_update(model, optimizer, grads)
        return loss.item()

    for _ in range(2):
        step()
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(4):
        step()
    mx.synchronize()
    return dict(step_ms=(time.perf_counter() - t0) / 4 * 1e3, weights_gb=weights / 1e9,
                peak_gb=mx.get_peak_memory() / 1e9, act_gb=(mx.get_peak_memory() - weights) / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--depths", nargs=2, type=int, default=[2, 6])
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.probe:
        if a.probe == "sdpa":
            r = probe_sdpa()
        else:
            v, layers = a.probe.split("@")
            r = probe_step(v, int(layers))
        print("RESULT " + json.dumps(r), flush=True)
        return
    variants = a.only or ["base", "stock", "nocompile", "nodropout", "noattn", "nomlp", "fused", "4bit", "4bit-fwd", "4bit-dep"]
    probes = ["sdpa"] + [f"{v}@{d}" for v in variants for d in a.depths]
    results = {}
    for p in probes:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--probe", p], capture_output=True, text=True, timeout=180)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        results[p] = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-400:]}
        print(f"{p}: {results[p]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    lo, hi = a.depths
    print(f"\nper layer (slope between {lo} and {hi} layers):")
    for v in variants:
        r0, r1 = results.get(f"{v}@{lo}", {}), results.get(f"{v}@{hi}", {})
        if "act_gb" in r0 and "act_gb" in r1:
            print(f"  {v:<10} activations {(r1['act_gb'] - r0['act_gb']) / (hi - lo) * 1e3:7.0f} MB/layer  "
                  f"time {(r1['step_ms'] - r0['step_ms']) / (hi - lo):6.1f} ms/layer  "
                  f"(fixed {r0['act_gb'] - lo * (r1['act_gb'] - r0['act_gb']) / (hi - lo):5.2f} GB)")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "probe_gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
