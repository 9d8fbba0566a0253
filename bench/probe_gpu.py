#!/usr/bin/env python3
"""Where the GPU step's memory and time go: the bench_gpu.py model at a few depths, one part switched at a time.

    source .g2/stage2.sh && python3 bench/probe_gpu.py --out $OUT

Every probe runs in its own process. Per-layer activation memory is the slope of (peak - weights) between
two depths, so fixed costs (logits, optimizer, allocator slack) drop out. Probes:
  sdpa            attention alone at the bench shape under value_and_grad: MLX's default, force_fused, and
                  the plain matmul-softmax-matmul, peak memory above the inputs (--no-sdpa skips it)
  ops             (--ops) the step's pieces alone at the bench shape: dropout masks, one LoRA adapter's
                  forward + backward in float32 and bf16, the loss plain and fused, the layer matmuls
  lora            (--lora) one adapter at the bench shape piece by piece, and the whole branch old, new and
                  (CUDA) seeded
  <variant>@<L>   the engine's step (compiled micro_step, compiled update) on an L-layer model, with one
                  thing changed: base (the engine's step), stock (plain autograd), nocompile, nodropout,
                  noattn (attention output = queries), nomlp (MLP = identity), fused (force_fused
                  attention), f32lora (LoRA products in float32), nofuse (gate and up as two matmuls),
                  bernoulli (MLX's masks on CUDA), stored (each adapter keeps its dropout mask, not its seed),
                  philox4 (four 24-bit mask draws per Philox call instead of eight 16-bit ones),
                  unfusedce (the plain loss), eagerupdate (optimizer op by op), old (f32lora + nofuse +
                  bernoulli + stored + unfusedce + philox4), 4bit (quantized forward, dequantized backward), 4bit-fwd
                  (dequantize in the forward pass too, custom VJP), 4bit-dep (the same, each dequantize
                  ordered after its input with mx.depends: what engine/model/qlora.py does);
                  a variant ending in ":all" has LoRA on all seven linear layers (base:all, nodropout:all)
--depths takes one depth (time only) or two (per-layer slopes); --repeat N runs the step probes N times,
interleaved, and keeps the median. PROBE_PROFILE=1 under `ncu --profile-from-start off` profiles one step of a
step probe (bench/ncu_table.py reads the CSV).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_gpu import BATCH, SEQ, SHAPE, build_model, median_run, random_batch  # noqa: E402


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


TIMED_STEPS = 8


def _timed(fn, *args, n=10):
    """(ms per call, GB above what was live before) of an evaluated call. The n calls are built as one graph
    first and the clock runs over its evaluation only: timed call by call, even queued, small ops sat on a
    ~0.045 ms floor of Python and graph overhead on an H100 (bench/RESULTS.md)."""
    import mlx.core as mx
    base = mx.get_active_memory()
    mx.eval(fn(*args))  # warm-up (compiles)
    mx.synchronize()
    mx.reset_peak_memory()
    mx.eval(fn(*args))  # one call alone: its memory
    mx.synchronize()
    extra_gb = round((mx.get_peak_memory() - base) / 1e9, 3)
    outs = [fn(*args) for _ in range(n)]
    t0 = time.perf_counter()
    mx.eval(outs)
    mx.synchronize()
    return dict(ms=round((time.perf_counter() - t0) / n * 1e3, 3), extra_gb=extra_gb)


def probe_ops() -> dict:
    """The step's pieces alone at the bench shape: dropout masks, the LoRA branch, the loss, the matmuls."""
    import mlx.core as mx
    from engine.model import lean
    out = {}
    d, m, v, tokens = SHAPE["hidden"], SHAPE["mlp"], SHAPE["vocab"], BATCH * SEQ
    x = mx.random.normal((BATCH, SEQ, d)).astype(mx.bfloat16)
    mx.eval(x)
    out["mask_bernoulli"] = _timed(lambda: mx.random.bernoulli(0.95, x.shape))
    out["mask_bernoulli16"] = _timed(lambda: mx.random.bernoulli(mx.array(0.95, mx.float16), x.shape))
    try:
        from engine.model.philox import philox_mask
        out["mask_philox"] = _timed(lambda: philox_mask(mx.random.randint(0, 2 ** 31 - 1, (2,)), x, 0.95))
        seed = mx.array([12345, 678], dtype=mx.int32)
        big = philox_mask(seed, x, 0.95)
        out["philox_check"] = dict(mean_keep=big.astype(mx.float32).mean().item(),
                                   other_seed_differs=(philox_mask(seed + 1, x, 0.95) != big).any().item())
    except Exception as e:  # noqa: BLE001  (reported; the other pieces are still timed)
        out["philox_error"] = str(e)[-600:]
    a = (mx.random.normal((d, 16)) * 0.01)
    b = mx.random.normal((16, d)) * 0.01
    mask = mx.random.bernoulli(0.95, x.shape)
    w = mx.random.normal(x.shape).astype(mx.bfloat16)
    mx.eval(a, b, mask, w)
    for name, in_dtype in (("lora_f32", False), ("lora_bf16", True)):
        branch = lean.lora_branch(0.95, 2.0, in_dtype)
        g = mx.compile(mx.value_and_grad(lambda x, a, b: (branch(w, x, a, b, mask) * w).astype(mx.float32).sum(),
                                         argnums=(0, 1, 2)))
        out[name] = _timed(g, x, a, b)
    logits = mx.random.normal((tokens, v)).astype(mx.bfloat16)
    targets = mx.random.randint(0, v, (tokens,))
    mx.eval(logits, targets)
    import mlx.nn as nn
    out["ce_plain"] = _timed(mx.compile(mx.value_and_grad(
        lambda l: nn.losses.cross_entropy(l.astype(mx.float32), targets).sum())), logits)
    out["ce_fused"] = _timed(mx.compile(mx.value_and_grad(
        lambda l: mx.fast.cross_entropy(l, targets).sum())), logits)
    h = x.reshape(tokens, d)
    hm = mx.random.normal((tokens, m)).astype(mx.bfloat16)
    mx.eval(hm)
    for name, (n_out, inp) in {"q": (d, h), "k": (SHAPE["kv_heads"] * SHAPE["head_dim"], h), "gate": (m, h),
                               "gate+up": (2 * m, h), "down": (d, hm)}.items():
        wt = mx.random.normal((n_out, inp.shape[1])).astype(mx.bfloat16)
        mx.eval(wt)
        r = _timed(lambda: inp @ wt.T)
        r["tflops"] = round(2 * tokens * n_out * inp.shape[1] / (r["ms"] / 1e3) / 1e12, 1)
        gy = mx.random.normal((tokens, n_out)).astype(mx.bfloat16)
        mx.eval(gy)
        rb = _timed(lambda: gy @ wt)  # the backward pass to the input
        r["bwd_tflops"] = round(2 * tokens * n_out * inp.shape[1] / (rb["ms"] / 1e3) / 1e12, 1)
        out["matmul_" + name] = r
    return out


def _old_lora_branch(keep: float, scale: float):
    """lean.lora_branch before issue 22 (a separate add, the scale on full-width arrays), for the comparison."""
    import mlx.core as mx

    def dropped(x, mask):
        return x if keep >= 1.0 else (mask * x) * (1 / keep)

    @mx.custom_function
    def branch(y, x, a, b, mask):
        a, b = a.astype(x.dtype), b.astype(x.dtype)
        return y + (scale * ((dropped(x, mask) @ a) @ b)).astype(x.dtype)

    @branch.vjp
    def branch_vjp(primals, cotangent, output):
        y, x, a32, b32, mask = primals
        x = mx.depends(x, cotangent)
        a, b = a32.astype(x.dtype), b32.astype(x.dtype)
        xd = dropped(x, mask)
        g = cotangent.astype(a.dtype) * scale
        gb = g @ b.T
        dx = dropped(gb @ a.T, mask)
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        da = flat(xd).T @ flat(gb)
        db = flat(xd @ a).T @ flat(g)
        return cotangent, dx.astype(x.dtype), da.astype(a32.dtype), db.astype(b32.dtype), mx.zeros_like(mask)

    return branch


def probe_lora() -> dict:
    """One adapter at the bench shape (4096 tokens, width 4096 and the down projection's 14336 -> 4096), piece
    by piece: the mask, each low-rank matmul (the skinny ones with K = tokens also split into chunks of tokens,
    a hand-made split-K), and the whole branch forward + backward, old and new, with and without dropout."""
    import mlx.core as mx
    from engine.model import lean
    from engine.model.loading import on_cuda
    from engine.model.philox import dropout_mask
    out = {}
    seed = mx.array([1, 2], dtype=mx.int32)
    tokens, r = BATCH * SEQ, 16
    for width_in, width_out in ((SHAPE["hidden"], SHAPE["hidden"]), (SHAPE["mlp"], SHAPE["hidden"])):
        tag = f"{width_in}x{width_out}"
        x = mx.random.normal((tokens, width_in)).astype(mx.bfloat16)
        y = mx.random.normal((tokens, width_out)).astype(mx.bfloat16)
        g = mx.random.normal((tokens, width_out)).astype(mx.bfloat16)
        a = (mx.random.normal((width_in, r)) * 0.01).astype(mx.bfloat16)
        b = (mx.random.normal((r, width_out)) * 0.01).astype(mx.bfloat16)
        h = mx.random.normal((tokens, r)).astype(mx.bfloat16)
        mask = dropout_mask(0.95, x)
        w = mx.random.normal((width_out, width_in)).astype(mx.bfloat16)
        mx.eval(x, y, g, a, b, h, mask, w)
        pieces = {
            "mask": lambda: dropout_mask(0.95, x),
            "dropped": lambda: (mask * x) * (1 / 0.95),
            "x@a": lambda: x @ a,
            "addmm(y,h,b)": lambda: mx.addmm(y, h, b),
            "y+h@b": lambda: y + (h @ b),
            "g@b.T": lambda: g @ b.T,
            "h@a.T": lambda: h @ a.T,
            "x.T@h (da)": lambda: x.T @ h,
            "h.T@g (db)": lambda: h.T @ g,
            "base x@W.T": lambda: x @ w.T,
        }
        for c in (4, 16):
            pieces[f"da split{c}"] = lambda c=c: (x.reshape(c, -1, width_in).swapaxes(1, 2)
                                                  @ h.reshape(c, -1, r)).astype(mx.float32).sum(0)
            pieces[f"db split{c}"] = lambda c=c: (h.reshape(c, -1, r).swapaxes(1, 2)
                                                  @ g.reshape(c, -1, width_out)).astype(mx.float32).sum(0)
        for name, fn in pieces.items():
            out[f"{tag} {name}"] = _timed(fn)["ms"]
        for label, keep in (("dropout", 0.95), ("nodropout", 1.0)):
            versions = [("old", _old_lora_branch(keep, 2.0), mask), ("new", lean.lora_branch(keep, 2.0, True), mask)]
            if keep < 1 and on_cuda():
                versions.append(("seeded", lean.lora_branch(keep, 2.0, True, seeded=True), seed))
            for version, branch, m in versions:
                m = m if keep < 1 else mx.array(True)
                f = mx.compile(mx.grad(lambda y, x, a, b: (branch(y, x, a, b, m) * g).astype(mx.float32).sum(),
                                       argnums=(0, 1, 2, 3)))
                out[f"{tag} branch {version} {label}"] = _timed(f, y, x, a.astype(mx.float32), b.astype(mx.float32))["ms"]
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
    """One variant's step; "NAME:all" puts LoRA on all seven linear layers instead of q/v."""
    variant, _, targets = variant.partition(":")
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.models import llama

    from engine.train import losses
    from engine.model import lean, philox
    from engine.train.losses import masked_loss
    from engine.train.step import accumulate_gradients, apply_update, build_micro_step, build_update, \
        checkpointed_layers

    losses.FUSED_CE = variant not in ("unfusedce", "old")
    lean.LORA_IN_INPUT_DTYPE = variant not in ("f32lora", "old")
    lean.FUSE_GATE_UP = variant not in ("nofuse", "old")  # True = fused here too (the default is CUDA only)
    philox.PHILOX_ON_CUDA = variant not in ("bernoulli", "old")
    lean.SEEDED_DROPOUT = variant not in ("stored", "old")
    philox.PER_CALL = 4 if variant in ("philox4", "old") else 8

    if variant == "noattn":
        llama.scaled_dot_product_attention = lambda q, k, v, cache=None, scale=1.0, mask=None: q
    if variant == "fused":
        llama.scaled_dot_product_attention = lambda q, k, v, cache=None, scale=1.0, mask=None: \
            mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, force_fused=True)
    if variant == "nomlp":
        llama.MLP.__call__ = lambda self, x: x
    if variant == "wholehead":
        losses.CE_CHUNK_BYTES = 0

    model = build_model(layers, 4 if "4bit" in variant else None, dropout=0.0 if variant == "nodropout" else 0.05,
                        dense_forward=variant == "4bit-dep", lean=variant != "stock", targets=targets or "qv")
    if variant == "4bit-fwd":  # dense forward without mx.depends: what engine/model/qlora.py did before it
        from engine.model.qlora import DequantizingLinear
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

    update = build_update(model, optimizer)
    if os.environ.get("PROBE_MEMORY_LIMIT_GB"):  # a tiny limit syncs after every op: the peak is the live set's
        mx.set_memory_limit(int(float(os.environ["PROBE_MEMORY_LIMIT_GB"]) * 1e9))
    checkpointing = checkpointed_layers(model, bool(os.environ.get("PROBE_CKPT")))
    checkpointing.__enter__()  # for the life of the process

    def step():
        grads, loss = accumulate_gradients(micro_step, [batch])
        if variant == "eagerupdate":
            apply_update(model, optimizer, grads)
        else:
            update(grads)
        return loss.item()

    for _ in range(2):
        step()
    mx.synchronize()
    if os.environ.get("PROBE_PROFILE"):  # under `ncu --profile-from-start off`: one step's kernels, nothing else
        import ctypes
        cuda = ctypes.CDLL("libcuda.so.1")
        cuda.cuProfilerStart()
        step()
        mx.synchronize()
        cuda.cuProfilerStop()
        return dict(profiled=True)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    mx.synchronize()
    return dict(step_ms=(time.perf_counter() - t0) / TIMED_STEPS * 1e3, weights_gb=weights / 1e9,
                peak_gb=mx.get_peak_memory() / 1e9, act_gb=(mx.get_peak_memory() - weights) / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--depths", nargs="+", type=int, default=[2, 6])
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="run the step probes this many times, interleaved")
    ap.add_argument("--ops", action="store_true", help="also time the step's pieces alone")
    ap.add_argument("--lora", action="store_true", help="also time one adapter piece by piece (probe_lora)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.probe:
        if a.probe in ("sdpa", "ops", "lora"):
            r = {"sdpa": probe_sdpa, "ops": probe_ops, "lora": probe_lora}[a.probe]()
        else:
            v, layers = a.probe.split("@")
            r = probe_step(v, int(layers))
        print("RESULT " + json.dumps(r), flush=True)
        return
    variants = a.only or ["base", "stock", "nocompile", "nodropout", "noattn", "nomlp", "fused", "4bit", "4bit-fwd", "4bit-dep"]
    probes = ([] if a.no_sdpa else ["sdpa"]) + (["ops"] if a.ops else []) + (["lora"] if a.lora else []) + [f"{v}@{d}" for _ in range(a.repeat) for v in variants for d in a.depths]
    runs: dict[str, list[dict]] = {}
    for p in probes:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--probe", p], capture_output=True, text=True, timeout=180)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-400:]}
        print(f"{p}: {r} ({time.perf_counter() - t0:.0f} s)", flush=True)
        runs.setdefault(p, []).append(r)
    results = {p: median_run(rs, "step_ms", "runs_ms") if len(rs) > 1 else rs[0] for p, rs in runs.items()}
    if a.repeat > 1:
        for p, r in results.items():
            if "runs_ms" in r:
                print(f"{p}: median {r['step_ms']:.1f} ms of {', '.join(f'{x:.1f}' for x in r['runs_ms'])}")
    lo, hi = a.depths[0], a.depths[-1]
    if lo != hi:
        print(f"\nper layer (slope between {lo} and {hi} layers):")
    for v in variants:
        r0, r1 = results.get(f"{v}@{lo}", {}), results.get(f"{v}@{hi}", {})
        if lo != hi and "act_gb" in r0 and "act_gb" in r1:
            print(f"  {v:<10} activations {(r1['act_gb'] - r0['act_gb']) / (hi - lo) * 1e3:7.0f} MB/layer  "
                  f"time {(r1['step_ms'] - r0['step_ms']) / (hi - lo):6.1f} ms/layer  "
                  f"(fixed {r0['act_gb'] - lo * (r1['act_gb'] - r0['act_gb']) / (hi - lo):5.2f} GB)")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "probe_gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
