"""QLoRA on a GPU: the frozen 4-bit layers' backward pass through a dequantized bf16 weight.

Under autograd MLX 0.32's CUDA backend differentiates `quantized_matmul` with a transposed quantized
matmul that runs at a small fraction of the bf16 rate. Here the forward pass stays a quantized matmul
(nothing bf16 is kept for the backward pass) and the custom VJP dequantizes the layer's weight for one
bf16 matmul, then drops it. Measured on an H100 (bench/gpu/run4.json, bench/RESULTS.md): 4.0k -> 6.1k
tokens/s at 42.6 -> 45.3 GB. Dequantizing in the forward pass as well runs at bf16 speed (13.3k) but MLX
keeps every traced forward intermediate, so each layer's bf16 weight lives until the backward pass
(55 GB: the memory of a bf16 base, which defeats QLoRA); that variant is not used.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _quantized_matmul_with_dense_backward(group_size: int, bits: int, mode: str):
    def biases_or_none(biases):
        return biases if biases.size else None

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return mx.quantized_matmul(x, w, scales, biases_or_none(biases), transpose=True,
                                   group_size=group_size, bits=bits, mode=mode)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        dense = mx.dequantize(w, scales, biases_or_none(biases), group_size, bits, mode=mode)
        dx = cotangent @ dense.astype(cotangent.dtype)
        # The base is frozen: its cotangents are never used, but every primal needs one.
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


class DequantizingLinear(nn.Module):
    """A frozen QuantizedLinear whose input gradient is computed through a dequantized weight."""

    def __init__(self, q: nn.QuantizedLinear):
        super().__init__()
        self.weight, self.scales = q.weight, q.scales
        self.biases = q.get("biases") if q.get("biases") is not None else mx.array([], dtype=q.scales.dtype)
        if "bias" in q:
            self.bias = q.bias
        self.group_size, self.bits, self.mode = q.group_size, q.bits, getattr(q, "mode", "affine")
        self._matmul = _quantized_matmul_with_dense_backward(self.group_size, self.bits, self.mode)
        self.freeze()

    def __call__(self, x):
        y = self._matmul(x, self.weight, self.scales, self.biases)
        return y + self.bias if "bias" in self else y


def dequantize_in_backward(model: nn.Module) -> int:
    """Swap every frozen QuantizedLinear (adapter bases included) for a DequantizingLinear; return how many."""
    swaps = []
    for _, module in model.named_modules():
        for key, child in module.children().items():
            if isinstance(child, nn.QuantizedLinear):
                swaps.append((module, key, child))
    for parent, key, child in swaps:
        setattr(parent, key, DequantizingLinear(child))
    return len(swaps)
