"""engine/model/lora_cuda.py's kernels give what lean.py's ops give for the same Philox masks (CUDA only: CI has
no GPU; run on the lent one, bench/bench_gpu.py's docstring says how), and take only what they can compute."""

import mlx.core as mx
import pytest

from engine.model import lean, lora_cuda, philox
from engine.model.loading import on_cuda

cuda_only = pytest.mark.skipif(not on_cuda(), reason="the fused LoRA dropout kernels are CUDA only")
# 192: three 64-column tiles (one per warp at most); 1088: seventeen, so a warp of `down` takes several tiles in
# turn (the last warp fewer) and `masked_up` splits a row into several groups of tiles, as at Mistral's widths
WIDTHS = [192, 1088]

KEEP, SCALE = 0.9, 2.0
FACTOR = SCALE / KEEP


def _inputs(rank: int, width: int = 192):
    """74 token rows (not a multiple of the kernels' 16), some inputs exactly +0 and -0."""
    mx.random.seed(0)
    x = mx.random.normal((2, 37, width)) * 2
    x = mx.where(mx.arange(width) < 6, 0.0, x)
    x = mx.where(mx.arange(width) == 7, -0.0, x).astype(mx.bfloat16)
    a, b = mx.random.normal((width, rank)) * 0.1, mx.random.normal((rank, 96)) * 0.1  # float32, as the adapters
    return x, a, b, mx.array([1234, 5678], dtype=mx.int32)


def _close(got, want, tol=1e-2):
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    return (mx.abs(got - want).max() <= tol * mx.abs(want).max()).item()


@cuda_only
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rank", [16, 32])
def test_down_is_the_product_of_the_masked_input(rank, width):
    x, a, _, seed = _inputs(rank, width)
    mask = philox.philox_mask(seed, x, KEEP)  # the mask kernel tests/test_philox.py checks against Random123
    assert 0.85 < mask.astype(mx.float32).mean().item() < 0.95
    got = lora_cuda.down(x, a.T.astype(mx.bfloat16), seed, KEEP, FACTOR)
    want = (mx.where(mask, x.astype(mx.float32), 0) @ a.astype(mx.bfloat16).astype(mx.float32)) * FACTOR
    assert got.shape == (2, 37, rank) and got.dtype == mx.bfloat16
    assert _close(got, want)
    unmasked = (x.astype(mx.float32) @ a.astype(mx.bfloat16).astype(mx.float32)) * FACTOR
    assert not _close(got, unmasked)  # the mask was applied


@cuda_only
def test_dropped_writes_the_masked_input_and_the_mask_in_the_sign_of_zero():
    x, _, _, seed = _inputs(16)
    mask = philox.philox_mask(seed, x, KEEP)
    got = lora_cuda.dropped(x, seed, KEEP, FACTOR)
    want = mx.where(mask, (x.astype(mx.float32) * FACTOR).astype(mx.bfloat16), 0)
    assert mx.array_equal(got, want).item()  # -0.0 == 0.0
    assert mx.array_equal(got.view(mx.uint16) == 0x8000, ~mask).item()  # kept zeros, +0 and -0, read as kept


@cuda_only
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rank", [16, 32])
def test_masked_up_is_the_masked_product_back_to_the_input(rank, width):
    x, a, _, seed = _inputs(rank, width)
    mask = philox.philox_mask(seed, x, KEEP)
    grad_h = mx.random.normal((2, 37, rank)).astype(mx.bfloat16)
    a16 = a.astype(mx.bfloat16)
    got = lora_cuda.masked_up(grad_h, a16, lora_cuda.dropped(x, seed, KEEP, FACTOR), FACTOR)
    want = mx.where(mask, (grad_h.astype(mx.float32) @ a16.astype(mx.float32).T) * FACTOR, 0)
    assert got.shape == x.shape and _close(got, want)
    assert mx.array_equal(got == 0, ~mask | (want == 0)).item()


@cuda_only
def test_an_adapter_through_the_kernels_has_the_ops_branch_value_and_gradients(monkeypatch):
    # lean.lora_branch's seeded ops (the path before the kernels, same Philox masks) against dropped_down +
    # add_up: the layer's output and the gradients of y, x, lora_a and lora_b.
    x, a, b, seed = _inputs(16)
    y = mx.random.normal((2, 37, 96)).astype(mx.bfloat16)
    w = mx.random.normal((2, 37, 96))
    monkeypatch.setattr(lora_cuda, "USE_KERNELS", True)  # off by default (lora_cuda.py says why)
    assert lora_cuda.applies(x, a, KEEP)

    def fused(y, x, a, b):
        return lora_cuda.add_up(y, lora_cuda.dropped_down(KEEP, SCALE)(x, a, seed), b)

    def ops(y, x, a, b):
        return lean.lora_branch(KEEP, SCALE, True, seeded=True)(y, x, a, b, seed)

    results = {}
    for name, f in (("fused", fused), ("ops", ops)):
        loss = lambda *p: (f(*p).astype(mx.float32) * w).sum()  # noqa: E731
        results[name] = mx.value_and_grad(loss, argnums=(0, 1, 2, 3))(y, x, a, b)
    (v_fused, g_fused), (v_ops, g_ops) = results["fused"], results["ops"]
    assert abs(v_fused.item() - v_ops.item()) <= 1e-2 * abs(v_ops.item()) + 1e-2
    for name, got, want in zip("yxab", g_fused, g_ops):
        assert got.dtype == want.dtype, name
        assert _close(got, want, 2e-2), name


@cuda_only
def test_a_lean_lora_layer_trains_through_the_kernels_as_through_the_ops(monkeypatch):
    # The wiring: LeanLoRALinear on bf16 activations takes the kernels (counted) and, from the same random
    # state (so the same seed), gives the ops' output and adapter gradients.
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear
    mx.random.seed(0)
    layer = LoRALinear.from_base(nn.Linear(192, 96, bias=False), r=16, dropout=0.1, scale=SCALE)
    layer.linear.set_dtype(mx.bfloat16)
    layer.linear.freeze()
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    layer.__class__ = lean.LeanLoRALinear
    layer.train()
    x = mx.random.normal((2, 37, 192)).astype(mx.bfloat16)
    calls = []
    real_down = lora_cuda.down
    monkeypatch.setattr(lora_cuda, "down", lambda *a: calls.append(1) or real_down(*a))

    def loss(model):
        return model(x).astype(mx.float32).square().sum()

    runs = {}
    for use in (True, False):
        monkeypatch.setattr(lora_cuda, "USE_KERNELS", use)
        mx.random.seed(5)
        value, grads = nn.value_and_grad(layer, loss)(layer)
        runs[use] = value.item(), dict(tree_flatten(grads)), len(calls)
    assert runs[True][2] == 1 and runs[False][2] == 1  # the kernels ran with USE_KERNELS only
    assert abs(runs[True][0] - runs[False][0]) <= 1e-2 * abs(runs[False][0])
    for k in ("lora_a", "lora_b"):
        assert _close(runs[True][1][k], runs[False][1][k], 2e-2), k


def test_the_kernels_take_only_what_they_can_compute(monkeypatch):
    # Runs everywhere: the gate alone. Off by default; forced on, only bf16 activations, widths of a multiple of
    # 64 (the kernels' tiles), ranks of a multiple of 16 up to MAX_RANK, and dropout on.
    x, a, _, _ = _inputs(16)
    assert not lora_cuda.applies(x, a, KEEP)  # USE_KERNELS is off
    monkeypatch.setattr(lora_cuda, "USE_KERNELS", True)
    assert lora_cuda.applies(x, a, KEEP)
    assert not lora_cuda.applies(x, a, 1.0)
    assert not lora_cuda.applies(x.astype(mx.float32), a, KEEP)
    assert not lora_cuda.applies(x[..., :96], a[:96], KEEP)
    assert not lora_cuda.applies(x, a[:, :8], KEEP)
    assert not lora_cuda.applies(x, mx.zeros((192, 2 * lora_cuda.MAX_RANK)), KEEP)
    assert not lora_cuda.applies(x, a[:128], KEEP)  # lora_a of another width
