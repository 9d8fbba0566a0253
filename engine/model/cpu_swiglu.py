"""SwiGLU, silu(gate) * up, for a training step on the CPU: a C++ primitive on every core
(engine/native/cpu_swiglu.cpp), where MLX's fused element-wise kernel runs on one while MKL's threads wait.
Same numbers as the ops to float rounding (tests/test_native_attention.py). GPUs, other dtypes and machines
where the primitive cannot be built keep lean.swiglu."""

from __future__ import annotations

import mlx.core as mx

from engine.model.loading import on_gpu

USE_KERNEL = True


def kernel():
    """The compiled module, or None (off, on a GPU, or not buildable: engine.native.build.reason says why)."""
    if not USE_KERNEL or on_gpu():
        return None
    from engine.native import build
    return build.load("cpu_swiglu")


def applies(gate, up) -> bool:
    return gate.dtype == up.dtype == mx.float32 and gate.shape == up.shape and kernel() is not None


def swiglu(gate, up):
    from engine import native
    return kernel().swiglu(gate, up, native.threads())
