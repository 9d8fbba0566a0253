"""Attention for training on the CPU, written so that `mx.compile` fuses its exponentials.

Under autograd MLX's CPU `scaled_dot_product_attention` falls back to matmul, softmax, matmul, and its
softmax is a precompiled scalar kernel (the Linux build's SIMD width is 1): at the embedded model's
4 x 320 tokens the exps of the 30 attention softmaxes were the largest non-BLAS cost of a training step.
Here the softmax is max, exp(s - max), sum and divide: element-wise ops that `mx.compile` fuses into
kernels built for this CPU (engine/native_jit.py). As in flash attention, the backward pass recomputes the
probabilities rather than keeping them. Grouped-query heads share their key and value through a broadcast
rather than a copy. Same results as MLX's to float rounding (tests/test_cpu_attention.py).

Used only while a training step is traced on the CPU (`training_attention()`); decoding and GPUs keep
MLX's kernel.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx


def attention(queries, keys, values, scale: float, mask=None, sinks=None, **kwargs):
    """softmax(q k^T * scale + mask) v for (B, H, L, D) queries and (B, KV, S, D) keys and values."""
    b, h, length, d = queries.shape
    kv, s = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(b, kv, h // kv, length, d)
    out = _attend(q, keys[:, :, None], values[:, :, None], _bias(mask, length, s, kv))
    return out.reshape(b, h, length, d)


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
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32) + bias
    e = mx.exp(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@mx.custom_function
def _attend(q, k, v, bias):
    return _probs(q, k, bias).astype(v.dtype) @ v


@_attend.vjp
def _attend_vjp(primals, cotangent, output):
    """Flash attention's backward pass: the probabilities are recomputed from q and k rather than kept
    (L x S a head and layer), so attention keeps less than MLX's own fallback does."""
    q, k, v, bias = primals
    q, k = mx.depends([q, k], cotangent)  # not before the gradient arrives: the recompute is big
    p = _probs(q, k, bias)
    grouped = lambda t: t.sum(axis=2, keepdims=True)  # noqa: E731  (k, v are shared by the H/KV heads)
    dv = grouped(p.astype(v.dtype).swapaxes(-1, -2) @ cotangent)
    dp = (cotangent @ v.swapaxes(-1, -2)).astype(mx.float32)
    ds = (p * (dp - (dp * p).sum(axis=-1, keepdims=True))).astype(q.dtype)
    return ds @ k, grouped(ds.swapaxes(-1, -2) @ q), dv, mx.zeros_like(bias)


@contextmanager
def training_attention(enabled: bool = True):
    """While tracing a training step on the CPU, models call `attention` instead of MLX's fused kernel
    (mlx-lm's models all reach it through mx.fast.scaled_dot_product_attention). Attention sinks keep
    MLX's kernel."""
    if not enabled:
        yield
        return
    original = mx.fast.scaled_dot_product_attention

    def routed(queries, keys, values, *, scale, mask=None, sinks=None, **kwargs):
        if sinks is not None or not (isinstance(mask, str) or mask is None or mask.ndim in (2, 4)):
            return original(queries, keys, values, scale=scale, mask=mask, sinks=sinks, **kwargs)
        return attention(queries, keys, values, scale, mask)

    mx.fast.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        mx.fast.scaled_dot_product_attention = original
