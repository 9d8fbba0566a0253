"""A training step's element-wise work on the CPU as C++ primitives on every core (engine/native/): the
attention and RoPE (routed by cpu_attention.py), RMSNorm, SwiGLU (silu(gate) * up) and the head's cross-entropy, where
MLX's element-wise kernels run on one core while MKL's threads wait. Same numbers as MLX's ops to float rounding
(tests/test_native.py). GPUs, other dtypes and machines where a primitive cannot be built keep the ops
(engine.native.build.reason says why); USE_KERNELS = False keeps them everywhere."""

from __future__ import annotations

import mlx.core as mx

from engine.model.loading import on_gpu

USE_KERNELS = True
KERNELS = ("cpu_attention", "cpu_swiglu", "cpu_cross_entropy", "cpu_rope", "cpu_rms_norm")


def kernel(name: str):
    """The compiled module engine/native/<name>.cpp, or None (off, on a GPU, or not buildable)."""
    if not USE_KERNELS or on_gpu():
        return None
    from engine.native import build
    return build.load(name)


def prepare() -> None:
    """Build (once) and load every kernel, so that none is compiled in the middle of a traced step."""
    for name in KERNELS:
        kernel(name)


def to_build() -> list[str]:
    """The kernels that the first step would compile first (a machine's first CPU run)."""
    if not USE_KERNELS or on_gpu():
        return []
    from engine.native import build
    return [name for name in KERNELS if build.needs_build(name)]


def device_note() -> str:
    """For the run's device line, on the CPU: which parts of a training step run on MLX's ops instead of these
    kernels, and why. Builds the kernels first (once), so that the run starts with them."""
    if on_gpu():
        return ""
    prepare()
    missing = [name for name in KERNELS if kernel(name) is None]
    if not missing:
        return ""
    from engine.native import build
    parts = ", ".join(name.removeprefix("cpu_").replace("_", "-") for name in missing)
    return f" (MLX ops for {parts}: {build.reason(missing[0]) or 'the kernels are off'})"


def swiglu_applies(gate, up) -> bool:
    return gate.dtype == up.dtype == mx.float32 and gate.shape == up.shape and kernel("cpu_swiglu") is not None


def swiglu(gate, up):
    from engine import native
    return kernel("cpu_swiglu").swiglu(gate, up, native.threads())


def cross_entropy_applies(logits) -> bool:
    return logits.ndim == 2 and kernel("cpu_cross_entropy") is not None


def cross_entropy(logits, targets):
    """Each row's logsumexp - its target's logit, in float32."""
    from engine import native
    return kernel("cpu_cross_entropy").cross_entropy(logits.astype(mx.float32), targets, native.threads())


def rope_applies(x, dims, base, offset, freqs) -> bool:
    """The kernel's case: mx.fast.rope of a float32 (B, H, L, D) array over all D, from position 0."""
    return (x.ndim == 4 and x.dtype == mx.float32 and dims == x.shape[-1] and x.shape[-1] % 2 == 0
            and freqs is None and base is not None and isinstance(offset, int) and offset == 0
            and kernel("cpu_rope") is not None)


def rope(x, base: float, scale: float, traditional: bool):
    """mx.fast.rope of the model's (B, H, L, D) view: the kernel works on the (B, L, H, D) layout beneath it and
    writes that layout, which the attention kernel reads without a copy (a transpose of a view is free)."""
    from engine import native
    return kernel("cpu_rope").rope(x.swapaxes(1, 2), base, scale, traditional, native.threads()).swapaxes(1, 2)


def rms_norm_applies(x, weight) -> bool:
    """The kernel's case: float32 x normalized over its last axis with a float32 weight."""
    return (x.dtype == mx.float32 and x.ndim >= 1 and x.shape[-1] > 0 and weight is not None
            and weight.dtype == mx.float32 and weight.ndim == 1 and weight.shape[0] == x.shape[-1]
            and kernel("cpu_rms_norm") is not None)


def rms_norm(x, weight, eps: float):
    from engine import native
    return kernel("cpu_rms_norm").rms_norm(x, weight, eps, native.threads())
