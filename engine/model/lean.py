"""Leaner autograd for LoRA training: the same gradients, less kept for the backward pass.

Plain autograd keeps, per transformer block, more than the backward pass needs:
- each LoRA adapter keeps its own dropped-out input, promoted to float32 for the product with the float32
  `lora_a`, plus the dropout mask: q_proj and v_proj each keep ~3 copies of the same input;
- the SwiGLU `silu(gate) * up` keeps gate, up, sigmoid(gate) and silu(gate): four (tokens x MLP width)
  arrays where two suffice.
Two custom VJPs keep only what is needed: the adapter keeps the layer input itself (one array, shared by every
adapter reading it) and its boolean dropout mask (on CUDA, outside checkpointed blocks, only the mask's Philox
seed: SEEDED_DROPOUT), and redoes the cheap low-rank products in the backward pass; the SwiGLU keeps gate and up
and recomputes the sigmoid. Each backward computation is tied with `mx.depends` to the incoming gradient, so the
scheduler cannot run it early and hold its result (the trap qlora.py describes). Two more savings in time: where
the activations are 16-bit, the low-rank products run in that dtype (the adapters and their gradients stay
float32), and frozen gate and up projections run as one matmul (q, k and v too, on CUDA).
Dropout masks come from engine/model/philox.py (mlx-lm's own draw off CUDA). Measured: bench/RESULTS.md.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as stock_swiglu
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from engine.model import checkpointed_lora_mlp, checkpointed_mlp, cpu_kernels, lora_cuda, swiglu_cuda
from engine.model.loading import cuda_default, on_gpu
from engine.model.philox import dropout_mask, dropout_seed, in_keyed_block, philox_mask

# MLP classes whose __call__ is exactly down_proj(swiglu(gate_proj(x), up_proj(x))).
_SWIGLU_MLP_MODULES = {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"}
# Attention classes whose __call__ starts q_proj(x), k_proj(x), v_proj(x), each called once on the same x.
_QKV_ATTENTION_MODULES = {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"}


@mx.custom_function
def swiglu(gate, up):
    return stock_swiglu(gate, up)


def _swiglu_grads(gate, up, cotangent):
    """(d gate, d up) of silu(gate) * up, from gate and up alone (the sigmoid is recomputed)."""
    # On the CPU mx.sigmoid alone is a scalar kernel; as exp it fuses into one built for the CPU (native_jit.py)
    sig = mx.sigmoid(gate) if on_gpu() else 1 / (1 + mx.exp(-gate))
    silu = gate * sig
    return cotangent * up * (sig + silu * (1 - sig)), cotangent * silu


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    return _swiglu_grads(mx.depends(gate, cotangent), up, cotangent)


# Switches for bench/probe_gpu.py's comparisons. LORA_IN_INPUT_DTYPE: the low-rank products run in the
# activations' dtype (bf16 on a GPU, as Unsloth does); the adapters, their gradients and the optimizer stay
# float32. FUSE_GATE_UP: see LeanSwiGLUMLP; None = on CUDA only (3% faster there, 10% slower on this CPU,
# where the split halves are strided; not measured on Metal). FUSE_QKV: the same for the frozen q, k and v
# projections (SharedProduct), CUDA only: on an H100, q/v LoRA 0.6-4.0% faster in three pairs of runs at 0.3 GB
# less, all seven layers even (bench/RESULTS.md). FUSE_QKV_QUANTIZED: the same for 4-bit bases (one dequantize
# for the three), off: even for q/v, 3% slower in one pair for all seven. bench_gpu.py's BENCH_FUSE_QKV sets both.
LORA_IN_INPUT_DTYPE = True
FUSE_GATE_UP: bool | None = None
FUSE_QKV: bool | None = None
FUSE_QKV_QUANTIZED: bool | None = False
# SPLIT_TOKENS = c: the adapter gradients (K = tokens, one side only rank wide) as c matmuls over token
# chunks, summed: a hand-made split-K for GEMMs that otherwise leave most of a GPU idle. 0 = one matmul.
SPLIT_TOKENS = 0
# SEEDED_DROPOUT: where masks are Philox (CUDA), an adapter keeps its mask's seed, not the mask, and the
# backward pass draws the mask again: one more Philox pass an adapter. On an H100, Mistral-7B shape, 2 x 2048
# tokens, LoRA on all seven layers: 44.7 -> 36.8 GB and +7% tokens/s in bf16, 34.7 -> 25.3 GB and -4% on a
# 4-bit base (bench/RESULTS.md). Not inside a checkpointed block (philox.dropout_seed says why).
# lora_cuda.USE_KERNELS (off) draws a seeded mask inside the adapter's products instead.
SEEDED_DROPOUT = True


@mx.custom_function
def swiglu_pair(gate_up):
    """swiglu over the two halves of one (..., 2 x width) array: the fused gate + up projection's output."""
    gate, up = mx.split(gate_up, 2, axis=-1)
    return stock_swiglu(gate, up)


@swiglu_pair.vjp
def _swiglu_pair_vjp(primals, cotangent, output):
    return swiglu_pair_grad(mx.depends(primals, cotangent), cotangent)  # one argument: its primal as is


def swiglu_pair_grad(gate_up, cotangent):
    """d swiglu_pair(gate_up) / d gate_up times `cotangent`: the CUDA kernel where it applies, else the ops."""
    if swiglu_cuda.applies(gate_up, cotangent):
        return swiglu_cuda.swiglu_pair_grad(gate_up, cotangent)
    # The gradient is written straight into one (..., 2, width) array, gate rows then up rows, by broadcast
    # element-wise ops (one fused kernel under mx.compile), not as two halves concatenated afterwards.
    pair = gate_up.reshape(*gate_up.shape[:-1], 2, -1)
    d_gate, d_up = _swiglu_grads(pair[..., :1, :], pair[..., 1:, :], cotangent[..., None, :])
    is_gate = (mx.arange(2) == 0).reshape(2, 1)
    return mx.where(is_gate, d_gate, d_up).reshape(gate_up.shape)


def fuse_rows(*layers: nn.Module) -> mx.array | None:
    """One weight for several bias-free Linear layers reading the same input, stacked by rows; each layer's
    weight becomes a view into it (no extra memory). None if any layer is not a plain bias-free nn.Linear."""
    if any(type(layer) is not nn.Linear or "bias" in layer for layer in layers):
        return None
    return stack_rows(layers, "weight")


def stack_rows(layers, name: str) -> mx.array:
    """The `name` arrays of `layers` stacked by rows into one; each layer's becomes a view into it."""
    stacked = mx.concatenate([getattr(layer, name) for layer in layers], axis=0)
    mx.eval(stacked)
    start = 0
    for layer in layers:
        rows = getattr(layer, name).shape[0]
        setattr(layer, name, stacked[start:start + rows])  # a slice of a row-contiguous array shares its buffer
        start += rows
    mx.eval([getattr(layer, name) for layer in layers])
    return stacked


class SharedProduct:
    """The frozen products of layers that read the same x one after another, as one matmul over their weights
    stacked by rows (`product`); each layer takes its columns. The first reader of a new x computes it, the
    last lets it go (held past the block, it would outlive the step)."""

    def __init__(self, product, widths: list[int]):
        self.product, self.readers = product, len(widths)
        self.bounds = [sum(widths[:i + 1]) for i in range(len(widths) - 1)]
        self._x, self._parts, self._left = None, None, 0

    def part(self, x, index: int):
        if x is not self._x or index == 0:  # index 0: a new block call, even after one that failed midway
            # mx.split, not slices: its gradient is one concatenate, where each slice's is a zero-filled
            # full-width update, and the three are then added
            self._x, self._parts, self._left = x, mx.split(self.product(x), self.bounds, axis=-1), self.readers
        part = self._parts[index]
        self._left -= 1
        if self._left == 0:
            self._x = self._parts = None
        return part


class SharedProductLinear(nn.Linear):
    """A frozen bias-free nn.Linear whose training pass takes its columns of a SharedProduct; its weight is a
    view into the shared one, so parameters, inference and saved files are nn.Linear's."""

    def __call__(self, x):
        if not self.training:
            return super().__call__(x)
        return shared_part(self, x)


def shared_part(layer: nn.Module, x):
    """The layer's columns of its SharedProduct. They are a view into the whole product: a layer whose output
    something keeps for the backward pass (k under Qwen3's k_norm, v under attention) gets a copy, or the
    whole product would stay alive with it; inside a LeanLoRALinear the addmm writes a new array anyway."""
    part = layer._shared.part(x, layer._index)
    return part if layer._in_adapter else mx.contiguous(part)


def frozen_qkv(attention: nn.Module, quantized: bool = False) -> list[tuple[nn.Module, bool]] | None:
    """The frozen q, k and v layers of an attention block that calls them in turn on one x, each with whether
    it sits inside a LeanLoRALinear, where FUSE_QKV (FUSE_QKV_QUANTIZED) lets them share one product; else None."""
    switch = FUSE_QKV_QUANTIZED if quantized else FUSE_QKV
    if not cuda_default(switch):
        return None
    if type(attention).__module__ not in _QKV_ATTENTION_MODULES or type(attention).__name__ != "Attention":
        return None
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    return [(p.linear, True) if type(p) is LeanLoRALinear else (p, False) for p in projections]


def share(frozen: list[tuple[nn.Module, bool]], shared_class: type, product) -> SharedProduct:
    """Give the `frozen` layers (weights already views into one stacked weight) one SharedProduct computing
    `product`."""
    shared = SharedProduct(product, [layer.weight.shape[0] for layer, _ in frozen])
    for index, (layer, in_adapter) in enumerate(frozen):
        layer.__class__ = shared_class  # only __call__ differs
        layer._shared, layer._index, layer._in_adapter = shared, index, in_adapter
    return shared


def share_product(frozen: list[tuple[nn.Module, bool]]) -> SharedProduct | None:
    """Run the `frozen` bf16/float layers as one matmul; None where one is not a frozen bias-free nn.Linear
    (DoRA, biased or trained layers keep their own; qlora.py shares quantized ones)."""
    layers = [layer for layer, _ in frozen]
    if any(type(f) is nn.Linear and f.trainable_parameters() for f in layers):
        return None
    fused = fuse_rows(*layers)
    return None if fused is None else share(frozen, SharedProductLinear, lambda x: x @ fused.T)


def apply_mask(mask, x, keep: float):
    """dropout(x) for a boolean mask (True = keep): the kept values scaled by 1 / keep, the others 0.

    `where`, not `mask * x`: the product promotes the mask to x's dtype, and under `mx.compile` that promoted
    copy, shared by the forward and backward passes, was what stayed alive between them: 4 bytes a value on
    the CPU instead of the mask's one (embedded model, LoRA on all seven layers, 4 x 512 tokens: 4.30 -> 3.38 GB
    peak; bench/RESULTS.md). Kept values are bit for bit the product's; a dropped one is +0 where the product
    gave -0 for a negative x and NaN for an infinite or NaN x (the frozen layer's output still carries those)."""
    return mx.where(mask, x * (1 / keep), 0)


def lora_branch(keep: float, scale: float, in_input_dtype: bool = False, seeded: bool = False):
    """f(y, x, a, b, mask) = y + scale * dropout(x) @ lora_a @ lora_b, y being the frozen layer's output; saves
    only its inputs.

    The sum is the epilogue of the rank-r matmul (`mx.addmm`), and the scale multiplies tokens x rank values,
    not tokens x width: with LoRA on all seven linear layers of a 7B model, each full-width pass over the
    adapters' outputs moves ~22 GB a step (~5 ms of a 0.31 s step on an H200, by bandwidth; not timed yet).
    `mask_or_seed` is the dropout draw (bool: one byte a value; off CUDA nn.Dropout's own Bernoulli draw, so
    the random stream and the result are exactly mlx-lm's), or with `seeded` (CUDA only) the Philox seed (two
    int32) that each pass draws the mask from."""

    def drawn(x, mask_or_seed):
        return philox_mask(mask_or_seed, x, keep) if seeded and keep < 1.0 else mask_or_seed

    @mx.custom_function
    def branch(y, x, a, b, mask_or_seed):
        a, b = lora_factors(x, a, b, in_input_dtype)
        return lora_forward(y, x, a, b, drawn(x, mask_or_seed), keep, scale)

    @branch.vjp
    def branch_vjp(primals, cotangent, output):
        y, x, a32, b32, mask_or_seed = primals
        x = mx.depends(x, cotangent)
        a, b = lora_factors(x, a32, b32, in_input_dtype)
        mask = drawn(x, mask_or_seed)  # from the x tied to the cotangent: not drawn early and held
        dx, da, db = lora_backward(cotangent, x, a, b, mask, keep, scale)
        # y's gradient is the cotangent itself: the frozen layer's backward reads it, nothing is copied.
        return cotangent, dx.astype(x.dtype), da.astype(a32.dtype), db.astype(b32.dtype), mx.zeros_like(mask_or_seed)

    return branch


def lora_factors(x, a, b, in_input_dtype: bool):
    """lora_a and lora_b in the dtype the low-rank products run in: x's with in_input_dtype, else their own."""
    return (a.astype(x.dtype), b.astype(x.dtype)) if in_input_dtype else (a, b)


def lora_forward(y, x, a, b, mask, keep: float, scale: float):
    """y + scale * dropout(x) @ a @ b (see lora_branch), a and b as lora_factors gives them."""
    h = ((x if keep >= 1.0 else apply_mask(mask, x, keep)) @ a) * scale  # tokens x rank
    if h.dtype == y.dtype:
        return mx.addmm(y, h, b)
    return y + (h @ b).astype(y.dtype)  # float32 factors on 16-bit activations (probe_gpu's f32lora)


def lora_backward(cotangent, x, a, b, mask, keep: float, scale: float):
    """(x's gradient through the adapter, lora_a's, lora_b's) of lora_forward for y's gradient; the caller casts."""
    g = cotangent.astype(a.dtype)  # no copy where the factors are in the activations' dtype
    gb = (g @ b.T) * scale  # tokens x rank
    xd = x if keep >= 1.0 else apply_mask(mask, x, keep)
    dx = gb @ a.T if keep >= 1.0 else apply_mask(mask, gb @ a.T, keep)
    return dx, _token_product(xd, gb), _token_product(xd @ a * scale, g)


def _token_product(left, right):
    """left^T @ right over all token rows (leading axes flattened), optionally split into SPLIT_TOKENS chunks."""
    left, right = left.reshape(-1, left.shape[-1]), right.reshape(-1, right.shape[-1])
    c = SPLIT_TOKENS
    if c < 2 or left.shape[0] % c:
        return left.T @ right
    parts = left.reshape(c, -1, left.shape[-1]).swapaxes(1, 2) @ right.reshape(c, -1, right.shape[-1])
    return parts.astype(mx.float32).sum(axis=0)


class LeanLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear (same parameters, same adapters file) whose training pass uses `lora_branch`."""

    def __call__(self, x):
        keep = self.dropout._p_1  # nn.Dropout keeps 1 - p there
        if not self.training:
            return super().__call__(x)
        # None off CUDA and inside checkpointed blocks (dropout_keys)
        seed = dropout_seed() if keep < 1.0 and SEEDED_DROPOUT else None
        y = self.linear(x)
        if (seed is not None and LORA_IN_INPUT_DTYPE and SPLIT_TOKENS < 2 and y.dtype == x.dtype
                and lora_cuda.applies(x, self.lora_a, keep)):  # the kernels compute as those two settings say
            return lora_cuda.add_up(y, lora_cuda.dropped_down(keep, self.scale)(x, self.lora_a, seed), self.lora_b)
        if seed is not None:
            branch, mask_or_seed = lora_branch(keep, self.scale, LORA_IN_INPUT_DTYPE, seeded=True), seed
        else:
            branch = lora_branch(keep, self.scale, LORA_IN_INPUT_DTYPE)
            mask_or_seed = dropout_mask(keep, x) if keep < 1.0 else mx.array(True)
        return branch(y, x, self.lora_a, self.lora_b, mask_or_seed)


class LeanSwiGLUMLP(nn.Module):
    """The llama-family MLP with the lean SwiGLU; same child names, so the same parameter paths.

    Where gate and up are frozen bias-free Linears, training runs them as one matmul over a fused weight
    (`_gate_up`, outside the parameter tree; the two layers' weights are views into it): one wider matmul
    runs nearer the GPU's peak, and the backward pass needs one matmul to the input instead of two + an add."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        fuse = cuda_default(FUSE_GATE_UP)
        self._gate_up = fuse_rows(self.gate_proj, self.up_proj) if fuse else None

    def __call__(self, x):
        if not self.training:
            return self.down_proj(stock_swiglu(self.gate_proj(x), self.up_proj(x)))
        if in_keyed_block() and checkpointed_mlp.applies(self):
            return checkpointed_mlp.checkpointed_mlp(self, x, swiglu_pair, swiglu_pair_grad)  # a checkpointed block
        if in_keyed_block() and checkpointed_lora_mlp.applies(self):  # the adapter math passed in: no import cycle
            factors = lambda v, a, b: lora_factors(v, a, b, LORA_IN_INPUT_DTYPE)  # noqa: E731
            return checkpointed_lora_mlp.checkpointed_lora_mlp(self, x, _swiglu_grads, factors, lora_forward,
                                                               lora_backward)
        if self._gate_up is not None:
            return self.down_proj(swiglu_pair(x @ self._gate_up.T))
        gate, up = self.gate_proj(x), self.up_proj(x)
        fused = cpu_kernels.swiglu if cpu_kernels.swiglu_applies(gate, up) else swiglu  # the CPU's on both cores
        return self.down_proj(fused(gate, up))


class MaskedDropout(nn.Dropout):
    """nn.Dropout drawing its mask through dropout_mask: the same draw from MLX's random state, but also
    Philox on CUDA and the block's key under gradient checkpointing (the recompute redraws the same mask)."""

    def __call__(self, x):
        if self._p_1 == 1 or not self.training:
            return x
        return apply_mask(dropout_mask(self._p_1, x), x, self._p_1)


def lean_autograd(model: nn.Module) -> int:
    """Switch a LoRA model's adapters and SwiGLU MLPs to the lean versions in place; return how many.
    DoRA layers keep mlx-lm's autograd and get only MaskedDropout."""
    n = 0
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = LeanLoRALinear  # only __call__ differs: isinstance checks and weights unchanged
            n += 1
        elif type(module) is DoRALinear and type(module.dropout) is nn.Dropout:
            module.dropout.__class__ = MaskedDropout
    layers = list(getattr(model, "layers", []))
    adapted = [i for i, layer in enumerate(layers)
               if any(isinstance(m, LeanLoRALinear) for _, m in layer.named_modules())]
    for layer in layers[adapted[0]:] if adapted else []:  # blocks below the first adapter have no backward pass
        mlp = getattr(layer, "mlp", None)
        if type(mlp).__module__ in _SWIGLU_MLP_MODULES and type(mlp).__name__ == "MLP":
            layer.mlp = LeanSwiGLUMLP(mlp)
            n += 1
        attention = getattr(layer, "self_attn", None)
        frozen = frozen_qkv(attention)
        n += frozen is not None and share_product(frozen) is not None
    return n
