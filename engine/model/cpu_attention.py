"""Attention for training on the CPU, written so that `mx.compile` fuses its exponentials.

Under autograd MLX's CPU `scaled_dot_product_attention` falls back to matmul, softmax, matmul, and its
softmax is a precompiled scalar kernel (the Linux build's SIMD width is 1): at the embedded model's
4 x 320 tokens the exps of the 30 attention softmaxes were the largest non-BLAS cost of a training step.
Here the softmax is max, exp(s - max), sum and divide: element-wise ops that `mx.compile` fuses into
kernels built for this CPU (engine/native_jit.py). As in flash attention, the backward pass recomputes the
probabilities rather than keeping them; a causal attention is cut into query chunks that skip the keys
they cannot see. Grouped-query heads share their key and value without a copy. Same results as MLX's to
float rounding (tests/test_cpu_attention.py).

Used only while a training step is traced on the CPU (`training_attention()`); decoding and GPUs keep
MLX's kernel. On Linux x86-64 the step's causal float32 attention goes further, to a C++ primitive built
on first use (engine/native/cpu_attention.cpp: the whole layer on every core, 4x faster than these ops);
these ops remain for the other masks and dtypes, and wherever the primitive cannot be built.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx

from engine.model import cpu_kernels
from engine.model.loading import on_gpu


def attention(queries, keys, values, scale: float, mask=None):
    """softmax(q k^T * scale + mask) v for (B, H, L, D) queries and (B, KV, S, D) keys and values.

    The H/KV query heads that share a key head are folded into the rows of one product, (H/KV x L) x S,
    so keys and values are never copied per head and each product is one larger matrix multiply."""
    length, s = queries.shape[2], keys.shape[2]
    chunks = causal_chunks(length, s) if isinstance(mask, str) else 1
    if chunks > 1:  # causal: query chunk i needs only the keys up to its end; the rest is masked work
        size = -(-length // chunks)
        parts = [_attention(queries[:, :, i:i + size], keys[:, :, :s - length + i + size],
                            values[:, :, :s - length + i + size], scale, mask)
                 for i in range(0, length, size)]
        return mx.concatenate(parts, axis=2)
    return _attention(queries, keys, values, scale, mask)


def _attention(queries, keys, values, scale: float, mask):
    b, h, length, d = queries.shape
    kv, s = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(b, kv, h // kv * length, d)  # free: the heads of a group are adjacent
    out = _attend(q, keys, values, _bias(mask, length, s, kv))
    return out.reshape(b, h, length, values.shape[-1])  # values may be wider than keys (MLA)


CHUNK_ROWS = 80  # 4 chunks at the sample data's ~320 tokens: 5.6 s a step against 6.0-6.9 for 1-3 or 6


def causal_chunks(length: int, s: int) -> int:
    """How many query chunks a causal self-attention of `length` tokens is cut into: chunk i computes
    (i + 1) / n of the keys, so n chunks do (n + 1) / 2n of the work of one (62% at 4, 56% at 8)."""
    return max(1, min(8, length // CHUNK_ROWS)) if length == s else 1


def _bias(mask, length: int, s: int, kv: int):
    """The mask as an additive float32 bias that broadcasts against (B, KV, H/KV, L, S) scores."""
    if mask is None:
        return mx.zeros((1, 1), mx.float32)
    if isinstance(mask, str):  # "causal": query i sees keys up to i + (S - L)
        mask = mx.arange(length)[:, None] + (s - length) >= mx.arange(s)[None]
    if mask.ndim == 4:  # (B or 1, H or 1, L, S) -> (B or 1, KV or 1, H/KV or 1, L, S)
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kv, -1, *mask.shape[2:])
    if mask.dtype == mx.bool_:
        return mx.where(mask, mx.array(0.0), mx.array(-mx.inf))
    return mask.astype(mx.float32)


def _probs(q, k, bias):
    """softmax over the keys of the (B, KV, S, H/KV x L) transposed scores plus the bias, as (B, KV, S, H/KV x L):
    keys run down the columns, so the softmax's max and sum reduce over a strided axis, which MLX's CPU
    reductions vectorize across the contiguous one (3.8x and 2.3x faster here than along the rows)."""
    scores = (k @ q.swapaxes(-1, -2)).astype(mx.float32)
    if bias.size > 1:  # the (.., L, S) bias as (.., S, 1, L), added to every head of the group: a free reshape
        bias_t = mx.moveaxis(bias[None] if bias.ndim == 2 else bias, -1, -3)
        scores = (scores.reshape(*scores.shape[:3], -1, bias.shape[-2]) + bias_t).reshape(scores.shape)
    else:  # no mask: zeros
        scores = scores + bias
    e = mx.exp(scores - mx.stop_gradient(scores.max(axis=-2, keepdims=True)))
    return e / e.sum(axis=-2, keepdims=True)


@mx.custom_function
def _attend(q, k, v, bias):
    return _probs(q, k, bias).astype(v.dtype).swapaxes(-1, -2) @ v  # a transposed operand: BLAS takes it as is


@_attend.vjp
def _attend_vjp(primals, cotangent, output):
    """Flash attention's backward pass: the probabilities are recomputed from q and k rather than kept
    (L x S a head and layer), so attention keeps less than MLX's own fallback does. The products over
    the folded rows sum the shared key and value heads' gradients by themselves. All (S x rows), as _probs."""
    q, k, v, bias = primals
    q, k = mx.depends([q, k], cotangent)  # not before the gradient arrives: the recompute is big
    p = _probs(q, k, bias)
    dv = p.astype(v.dtype) @ cotangent
    dp = (v @ cotangent.swapaxes(-1, -2)).astype(mx.float32)
    ds = (p * (dp - (dp * p).sum(axis=-2, keepdims=True))).astype(q.dtype)
    return ds.swapaxes(-1, -2) @ k, ds @ q, dv, mx.zeros_like(bias)


def native_kernel():
    """The compiled CPU attention module (engine/native/cpu_attention.cpp), or None where the kernels are off or
    it could not be built: then the ops above run (cpu_kernels.kernel)."""
    return cpu_kernels.kernel("cpu_attention")


def native_attention(kernel, queries, keys, values, scale: float, causal: bool, threads: int):
    """The kernel on (B, H, L, D) queries and (B, KV, S, D) keys and values, as mx.fast's attention. It works on the
    (B, L, H, D) layout the model's projections make and the output projection takes, so the transposes here are
    views: no copy on the way in or out, in either direction."""
    return kernel.attention(queries.swapaxes(1, 2), keys.swapaxes(1, 2), values.swapaxes(1, 2), scale, causal,
                            threads).swapaxes(1, 2)


def _kernel_takes(queries, keys, values, mask) -> bool:
    """The kernel's cases: float32, causal (the training step's mask) or none, as many keys as queries or more."""
    causal_or_none = mask is None or (isinstance(mask, str) and mask == "causal")
    return causal_or_none and queries.dtype == keys.dtype == values.dtype == mx.float32 \
        and queries.ndim == keys.ndim == 4 and keys.shape == values.shape and queries.shape[0] == keys.shape[0] \
        and queries.shape[3] == keys.shape[3] and keys.shape[2] >= queries.shape[2] \
        and queries.shape[1] % keys.shape[1] == 0


@contextmanager
def training_attention():
    """While a training step is traced on the CPU, models call `attention` (or the C++ kernel) instead of MLX's
    fused kernel (mlx-lm's models all reach it through mx.fast.scaled_dot_product_attention), and their RoPE
    and RMSNorm run as cpu_kernels' primitives where they apply; on a GPU nothing changes. Attention sinks keep
    MLX's kernel."""
    if on_gpu():
        yield
        return
    original = mx.fast.scaled_dot_product_attention
    from engine import native
    cpu_kernels.prepare()  # built here on first use (~5 s each, once per machine and MLX), not inside the step
    kernel = native_kernel()

    def routed(queries, keys, values, *, scale, mask=None, sinks=None, **kwargs):
        if sinks is not None or not (isinstance(mask, str) or mask is None or mask.ndim in (2, 4)):
            return original(queries, keys, values, scale=scale, mask=mask, sinks=sinks, **kwargs)
        if kernel is not None and _kernel_takes(queries, keys, values, mask):
            return native_attention(kernel, queries, keys, values, scale, mask is not None,
                                    native.threads(calls_blas=True))
        return attention(queries, keys, values, scale, mask)

    original_rope = mx.fast.rope

    def routed_rope(x, dims, *, traditional, base, scale, offset, freqs=None, **kwargs):
        if cpu_kernels.rope_applies(x, dims, base, offset, freqs):
            return cpu_kernels.rope(x, base, scale, traditional)
        return original_rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs,
                             **kwargs)

    original_norm = mx.fast.rms_norm

    def routed_norm(x, weight, eps, **kwargs):
        if not kwargs and cpu_kernels.rms_norm_applies(x, weight):
            return cpu_kernels.rms_norm(x, weight, eps)
        return original_norm(x, weight, eps, **kwargs)

    mx.fast.scaled_dot_product_attention, mx.fast.rope, mx.fast.rms_norm = routed, routed_rope, routed_norm
    try:
        yield
    finally:
        mx.fast.scaled_dot_product_attention, mx.fast.rope, mx.fast.rms_norm = original, original_rope, original_norm
