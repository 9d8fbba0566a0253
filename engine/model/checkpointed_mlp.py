"""The frozen SwiGLU MLP inside a gradient-checkpointed block: its backward pass recomputes the gate + up
product itself, a chunk of token rows at a time.

Checkpointing recomputes the block in the backward pass, and autograd then keeps the whole (tokens x 2 x MLP
width) gate + up product for the SwiGLU's gradient, next to that gradient and the down projection's: 17.5
(tokens x hidden) arrays at once, the largest thing alive in a checkpointed step (Mistral-7B shape, 4,096
tokens: ~590 MB). Here the MLP is a custom function of its input alone, so the recompute skips it, and its
backward pass takes the rows in CHUNKS chunks, each ordered after the one before with mx.depends: product,
SwiGLU gradient, product back to the input, then the next. The gate + up product is still computed once per
step in the backward pass, as before, so no FLOP is added; at most 17.5 / CHUNKS of those arrays live at once.
Only for frozen, bias-free projections with gate + up fused (lean.LeanSwiGLUMLP._gate_up): nothing to train
in the MLP, so the input's gradient is all the backward pass owes.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.model.loading import cuda_default

# None: on CUDA, where gate + up are fused by default (lean.FUSE_GATE_UP). CHUNKS: how many row chunks.
CHECKPOINTED_MLP: bool | None = None
CHUNKS = 2


def applies(mlp) -> bool:
    """Whether `mlp` (a LeanSwiGLUMLP) can run as checkpointed_mlp: gate + up fused, a frozen plain down."""
    down = mlp.down_proj
    return (cuda_default(CHECKPOINTED_MLP) and mlp._gate_up is not None and type(down) is nn.Linear
            and "bias" not in down and not down.trainable_parameters())


def checkpointed_mlp(mlp, x: mx.array, swiglu_pair, swiglu_pair_grad) -> mx.array:
    """mlp(x) for a training pass inside a checkpointed block (see the module's docstring). The SwiGLU of the
    fused product and its gradient are lean.py's (passed in: lean.py calls this)."""
    gate_up, down = mlp._gate_up, mlp.down_proj.weight  # frozen: closures, not primals

    @mx.custom_function
    def mlp_of(x):
        return swiglu_pair(x @ gate_up.T) @ down.T

    @mlp_of.vjp
    def mlp_vjp(primals, cotangent, output):
        rows = primals.reshape(-1, primals.shape[-1])
        grad = cotangent.reshape(-1, cotangent.shape[-1])
        done = grad  # the first chunk waits for the incoming gradient: not recomputed early and held
        parts = []
        for chunk, g in zip(_chunks(rows), _chunks(grad)):
            chunk, g = mx.depends(chunk, done), mx.depends(g, done)  # neither product runs ahead of its turn
            parts.append(swiglu_pair_grad(chunk @ gate_up.T, g @ down) @ gate_up)
            done = parts[-1]
        return mx.concatenate(parts).reshape(primals.shape)

    return mlp_of(x)


def _chunks(rows: mx.array) -> list[mx.array]:
    n = rows.shape[0]
    bounds = [n * i // CHUNKS for i in range(1, CHUNKS)]
    return mx.split(rows, bounds) if CHUNKS > 1 and n >= CHUNKS else [rows]
