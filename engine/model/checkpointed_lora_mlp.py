"""The SwiGLU MLP of a gradient-checkpointed block when gate, up or down carry LoRA adapters: checkpointed_mlp.py's
recompute-in-chunks, extended to the adapters' gradients.

Under checkpointing the backward pass recomputes the block, and autograd then keeps the whole gate and up
outputs, the SwiGLU's output (down's adapter input) and its mask, next to their gradients: about seven (tokens x
MLP width) arrays at once, the largest thing alive in a checkpointed step with LoRA on all seven layers. Here the
MLP is one custom function of its input and the adapters' factors. Its backward pass takes the token rows in
checkpointed_mlp.CHUNKS chunks, each after the one before (mx.depends): recompute gate, up and the SwiGLU for the
chunk, the down adapter's gradients, the SwiGLU's gradient, then gate's and up's; the factors' gradients are
summed over the chunks in float32. No product is computed more often than autograd's recompute computes it.
Dropout masks are drawn from the block's keys in the order the layers would draw them (gate, up, down), so the
forward pass is the plain layers' own, and the backward pass draws the same masks again.
Applies to bias-free projections that are plain nn.Linear or LoRA (mlx-lm's LoRALinear over a plain Linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as stock_swiglu
from mlx_lm.tuner.lora import LoRALinear

from engine.model import checkpointed_mlp
from engine.model.loading import cuda_default
from engine.model.philox import keyed_mask, next_mask_key

# None: on CUDA only. There (H100, all seven + checkpointing) it took 1.1 GB off the peak at the same speed, and at
# a tight limit ran 5% faster (bench/RESULTS.md, twenty-first session); on a 2-core CPU the step was 11-14% slower.
CHECKPOINTED_LORA_MLP: bool | None = None


@dataclass
class _Projection:
    weight: mx.array  # the frozen weight (out x in)
    adapted: bool = False  # whether a LoRA adapter sits on it (its factors are in the custom function's inputs)
    scale: float = 0.0
    keep: float = 1.0  # 1 - its dropout
    key: mx.array | None = None  # its mask's key (drawn in the plain layers' order)


def _frozen(layer) -> bool:
    return type(layer) is nn.Linear and "bias" not in layer and not layer.trainable_parameters()


def _lora(layer) -> bool:
    return isinstance(layer, LoRALinear) and type(layer.linear) is nn.Linear and "bias" not in layer.linear


def applies(mlp) -> bool:
    """Whether `mlp` (a LeanSwiGLUMLP) can run as checkpointed_lora_mlp: adapters on some projection, every
    projection bias-free and either frozen plain or LoRA."""
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return (cuda_default(CHECKPOINTED_LORA_MLP) and any(_lora(layer) for layer in layers)
            and all(_lora(layer) or _frozen(layer) for layer in layers))


def checkpointed_lora_mlp(mlp, x: mx.array, swiglu_grads, lora_factors, lora_forward, lora_backward) -> mx.array:
    """mlp(x) for a training pass inside a checkpointed block (see the module's docstring). The SwiGLU's
    gradient and the adapters' own math (lora_factors(x, a, b), lora_forward, lora_backward) are lean.py's, passed
    in: lean.py calls this."""
    projections, factors = [], []
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if not _lora(layer):
            projections.append(_Projection(layer.weight))
            continue
        keep = layer.dropout._p_1
        key = next_mask_key() if keep < 1 else None  # the plain layer would draw its mask now
        projections.append(_Projection(layer.linear.weight, True, layer.scale, keep, key))
        factors += [layer.lora_a, layer.lora_b]

    def mask(p: _Projection, like):
        return keyed_mask(p.key, p.keep, like) if p.key is not None else None

    def project(p: _Projection, v, ab, m):  # the plain layer's forward: frozen product + adapter
        y = v @ p.weight.T
        return lora_forward(y, v, *lora_factors(v, *ab), m, p.keep, p.scale) if p.adapted else y

    def split(params):  # the factors, a pair per adapted projection, None for a frozen one
        it = iter(params)
        return [(next(it), next(it)) if p.adapted else None for p in projections]

    @mx.custom_function
    def mlp_of(x, *params):
        (pg, pu, pd), (fg, fu, fd) = projections, split(params)
        gate, up = project(pg, x, fg, mask(pg, x)), project(pu, x, fu, mask(pu, x))
        act = stock_swiglu(gate, up)
        return project(pd, act, fd, mask(pd, act))

    @mlp_of.vjp
    def mlp_vjp(primals, cotangent, output):
        x, params = primals[0], primals[1:]
        (pg, pu, pd), (fg, fu, fd) = projections, split(params)
        rows = mx.depends(x, cotangent).reshape(-1, x.shape[-1])  # not recomputed early and held
        grad = cotangent.reshape(-1, cotangent.shape[-1])
        wide = mx.broadcast_to(mx.depends(mx.array(False), cotangent), (rows.shape[0], pd.weight.shape[1]))
        masks = [mask(pg, rows), mask(pu, rows), mask(pd, wide)]  # whole: the same draws as the forward pass
        sums = [mx.zeros(f.shape, mx.float32) for f in params]
        done, parts, start = grad, [], 0
        for chunk, g in zip(checkpointed_mlp._chunks(rows), checkpointed_mlp._chunks(grad)):
            chunk, g = mx.depends(chunk, done), mx.depends(g, done)  # neither runs ahead of its turn
            mg, mu, md = (None if m is None else m[start:start + chunk.shape[0]] for m in masks)
            start += chunk.shape[0]
            gate, up = project(pg, chunk, fg, mg), project(pu, chunk, fu, mu)
            act = stock_swiglu(gate, up)
            d_act, down_grads = backward(pd, act, g, fd, md)
            d_gate, d_up = swiglu_grads(gate, up, d_act)
            dx_gate, gate_grads = backward(pg, chunk, d_gate, fg, mg)
            dx_up, up_grads = backward(pu, chunk, d_up, fu, mu)
            parts.append(dx_gate + dx_up)
            grads = [g for pair in (gate_grads, up_grads, down_grads) if pair for g in pair]
            sums = [s + d.astype(mx.float32) for s, d in zip(sums, grads)]
            done = mx.depends(parts[-1], sums)  # the next chunk waits for this one's factor gradients too
        dx = mx.concatenate(parts).reshape(x.shape).astype(x.dtype)
        return (dx, *(s.astype(f.dtype) for s, f in zip(sums, params)))

    def backward(p: _Projection, v, g, ab, m):
        """(v's gradient, (lora_a's, lora_b's) or None) of project(p, v, ab, m) for output gradient g."""
        dv = g @ p.weight
        if not p.adapted:
            return dv, None
        dv_adapter, da, db = lora_backward(g, v, *lora_factors(v, *ab), m, p.keep, p.scale)
        return dv + dv_adapter.astype(dv.dtype), (da, db)

    return mlp_of(x, *factors)
