"""QLoRA on a GPU: each frozen 4-bit layer runs as a bf16 matmul on a weight dequantized just in time (DoRA
layers excepted: mlx-lm's DoRALinear dequantizes its own base).

MLX 0.32's CUDA `quantized_matmul` at training shapes (thousands of rows) runs at a fraction of the bf16
matmul rate, and its autograd backward is another quantized matmul. Here both passes dequantize the
layer's weight and run one bf16 matmul (as bitsandbytes does), under a custom VJP so that nothing bf16 is
saved for the backward pass. The catch was scheduling: a dequantize depends only on the weights, so MLX
was free to run every layer's dequantize early and hold all the bf16 copies at once (55 GB, more than a
bf16 base). `mx.depends` ties each dequantize to the array it multiplies (the layer input, or the incoming
gradient), so at most a layer's worth exists at a time. Measured on an H100 (bench/gpu/run6.json,
bench/RESULTS.md): 12.4k tokens/s at 46.3 GB, against 6.1k at 45.8 GB with the quantized forward pass and
14.0k at 51.5 GB with a bf16 base.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.dora import DoRALinear

from engine.model.lean import frozen_qkv, share, shared_part, stack_rows


def _biases_or_none(biases):
    return biases if biases.size else None  # an empty array stands for "none" (custom functions take arrays)


def _matmul_with_dense_backward(group_size: int, bits: int, mode: str, dense_forward: bool):
    def dense(w, scales, biases, after, dtype):
        # mx.depends: dequantize only once `after` exists. Without it the scheduler may run every layer's
        # dequantize (inputs: weights only) early and hold all the bf16 copies at once.
        w = mx.depends(w, after)
        return mx.dequantize(w, scales, _biases_or_none(biases), group_size, bits, mode=mode).astype(dtype)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        if dense_forward:
            return x @ dense(w, scales, biases, x, x.dtype).T
        return mx.quantized_matmul(x, w, scales, _biases_or_none(biases), transpose=True,
                                   group_size=group_size, bits=bits, mode=mode)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        dx = cotangent @ dense(w, scales, biases, cotangent, cotangent.dtype)
        # The base is frozen: its cotangents are never used, but every primal needs one.
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


class DequantizingLinear(nn.Module):
    """A frozen QuantizedLinear that multiplies through its dequantized weight, forward and backward.

    A few rows (token-by-token generation) still go through `quantized_matmul`, which is the fast path
    there: dequantizing the whole weight for one row would cost more than the product.
    """

    FEW_ROWS = 16

    def __init__(self, q: nn.QuantizedLinear, dense_forward: bool = True):
        super().__init__()
        self.weight, self.scales = q.weight, q.scales
        self.biases = q.get("biases") if q.get("biases") is not None else mx.array([], dtype=q.scales.dtype)
        if "bias" in q:
            self.bias = q.bias
        self.group_size, self.bits, self.mode = q.group_size, q.bits, getattr(q, "mode", "affine")
        self._matmul = _matmul_with_dense_backward(self.group_size, self.bits, self.mode, dense_forward)
        self.freeze()

    def __call__(self, x):
        if x.size // x.shape[-1] <= self.FEW_ROWS:
            y = mx.quantized_matmul(x, self.weight, self.scales, _biases_or_none(self.biases),
                                    transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode)
        else:
            y = self._matmul(x, self.weight, self.scales, self.biases)
        return y + self.bias if "bias" in self else y


class SharedDequantizingLinear(DequantizingLinear):
    """A DequantizingLinear whose training pass takes its columns of one product shared with the layers read
    on the same input (lean.SharedProduct: one dequantize and one matmul for q, k and v)."""

    def __call__(self, x):
        if not self.training or x.size // x.shape[-1] <= self.FEW_ROWS:
            return super().__call__(x)
        return shared_part(self, x)


def share_dequantized_product(frozen: list[tuple[nn.Module, bool]]):
    """Stack the quantized weights of the `frozen` layers (lean.frozen_qkv's pairs) by rows (each layer's
    arrays become views: no extra memory) and give them one shared product; None unless all are bias-free
    DequantizingLinears quantized alike."""
    layers = [layer for layer, _ in frozen]
    first = layers[0]
    if any(type(q) is not DequantizingLinear or "bias" in q or (q.group_size, q.bits, q.mode, q.biases.size > 0)
           != (first.group_size, first.bits, first.mode, first.biases.size > 0) for q in layers):
        return None
    # an empty biases array stands for "none" (mode without biases): nothing to stack
    names = ("weight", "scales", "biases") if first.biases.size else ("weight", "scales")
    stacked = [stack_rows(layers, name) for name in names] + ([] if first.biases.size else [first.biases])
    matmul = first._matmul  # same group size, bits and mode for all: one function serves them
    return share(frozen, SharedDequantizingLinear, lambda x: matmul(x, *stacked))


def dequantize_just_in_time(model: nn.Module, dense_forward: bool = True) -> int:
    """Swap every frozen QuantizedLinear (LoRA bases included) for a DequantizingLinear; return how many.
    Where lean.FUSE_QKV_QUANTIZED allows (off by default), an attention block's q, k and v then share one product.
    A DoRA layer's base stays: mlx-lm's DoRALinear dequantizes its base weight itself, and only while that is a
    QuantizedLinear (swapped, it multiplied by the packed 4-bit words and a QLoRA + DoRA run failed at step 1)."""
    swaps = []
    for _, module in model.named_modules():
        if isinstance(module, DoRALinear):
            continue
        for key, child in module.children().items():
            if isinstance(child, nn.QuantizedLinear):
                swaps.append((module, key, child))
    for parent, key, child in swaps:
        setattr(parent, key, DequantizingLinear(child, dense_forward))
    for layer in getattr(model, "layers", []):
        attention = getattr(layer, "self_attn", None)
        frozen = frozen_qkv(attention, quantized=True)
        if frozen is not None:
            share_dequantized_product(frozen)
    return len(swaps)
