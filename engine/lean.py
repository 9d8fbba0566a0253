"""Leaner autograd for LoRA training: the same gradients, less kept for the backward pass.

Plain autograd keeps, per transformer block, more than the backward pass needs:
- each LoRA adapter keeps its own dropped-out input, promoted to float32 for the product with the float32
  `lora_a`, plus the dropout mask: q_proj and v_proj each keep ~3 copies of the same input;
- the SwiGLU `silu(gate) * up` keeps gate, up, sigmoid(gate) and silu(gate): four (tokens x MLP width)
  arrays where two suffice.
Two custom VJPs keep only what is needed: the adapter keeps the layer input itself (one array, shared by
every adapter reading it) and its boolean dropout mask, and redoes the cheap low-rank products in the
backward pass; the SwiGLU keeps gate and up and recomputes the sigmoid. Each backward computation is tied with `mx.depends` to the
incoming gradient, so the scheduler cannot run it early and hold its result (the trap qlora.py describes).
Measured per block: bench/RESULTS.md.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as stock_swiglu
from mlx_lm.tuner.lora import LoRALinear

# MLP classes whose __call__ is exactly down_proj(swiglu(gate_proj(x), up_proj(x))).
_SWIGLU_MLP_MODULES = {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"}


@mx.custom_function
def swiglu(gate, up):
    return stock_swiglu(gate, up)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    gate = mx.depends(gate, cotangent)
    sig = mx.sigmoid(gate)
    silu = gate * sig
    return cotangent * up * (sig + silu * (1 - sig)), cotangent * silu


def lora_branch(keep: float, scale: float):
    """f(x, lora_a, lora_b, mask) = scale * dropout(x) @ lora_a @ lora_b in x's dtype, saving only its inputs.

    `mask` is nn.Dropout's own Bernoulli draw (bool: one byte a value), so the random stream and the
    result are exactly mlx-lm's."""

    def dropped(x, mask):
        return x if keep >= 1.0 else (mask * x) * (1 / keep)

    @mx.custom_function
    def branch(x, a, b, mask):
        return (scale * ((dropped(x, mask) @ a) @ b)).astype(x.dtype)

    @branch.vjp
    def branch_vjp(primals, cotangent, output):
        x, a, b, mask = primals
        x = mx.depends(x, cotangent)
        xd = dropped(x, mask)
        g = cotangent.astype(a.dtype) * scale
        gb = g @ b.T
        dx = dropped(gb @ a.T, mask)
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        da = flat(xd).T @ flat(gb)
        db = flat(xd @ a).T @ flat(g)
        return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype), mx.zeros_like(mask)

    return branch


class LeanLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear (same parameters, same adapters file) whose training pass uses `lora_branch`."""

    def __call__(self, x):
        keep = self.dropout._p_1  # nn.Dropout keeps 1 - p there
        if not self.training:
            return super().__call__(x)
        mask = mx.random.bernoulli(keep, x.shape) if keep < 1.0 else mx.array(True)
        return self.linear(x) + lora_branch(keep, self.scale)(x, self.lora_a, self.lora_b, mask)


class LeanSwiGLUMLP(nn.Module):
    """The llama-family MLP with the lean SwiGLU; same child names, so the same parameter paths."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def __call__(self, x):
        act = swiglu if self.training else stock_swiglu
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))


def lean_autograd(model: nn.Module) -> int:
    """Switch a LoRA model's adapters and SwiGLU MLPs to the lean versions in place; return how many."""
    n = 0
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = LeanLoRALinear  # only __call__ differs: isinstance checks and weights unchanged
            n += 1
    layers = list(getattr(model, "layers", []))
    adapted = [i for i, layer in enumerate(layers)
               if any(isinstance(m, LeanLoRALinear) for _, m in layer.named_modules())]
    for layer in layers[adapted[0]:] if adapted else []:  # blocks below the first adapter have no backward pass
        mlp = getattr(layer, "mlp", None)
        if type(mlp).__module__ in _SWIGLU_MLP_MODULES and type(mlp).__name__ == "MLP":
            layer.mlp = LeanSwiGLUMLP(mlp)
            n += 1
    return n
