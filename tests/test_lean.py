"""engine/model/lean.py's backward passes train exactly as mlx-lm's layers do, on the embedded model with the
default LoRA (dropout included), and a training step takes less memory with them; the GPU memory limit
follows training.memory_limit_gb."""

import gc
import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from engine.model import lean
from engine.model.adapters import apply_lora
from engine.config.schema import Config
from engine.model.lean import LeanLoRALinear, LeanSwiGLUMLP, SharedProductLinear
from engine.model.loading import load_model, on_cuda
from engine.model.memory import AdapterPlacement, ModelShape, estimate_step_memory, gpu_memory_limit
from helpers import ROOT


def _adapted_model(lean: bool, train: bool, dtype=None):
    cfg = Config()  # the default LoRA: rank 8 on q_proj and v_proj, dropout 0.05
    model, _, _ = load_model(cfg.model)
    if dtype is not None:
        model.set_dtype(dtype)
    mx.random.seed(0)
    apply_lora(model, cfg.lora, lean=lean)
    for _, p in tree_flatten(model.trainable_parameters()):  # non-zero B, so every gradient path is used
        p[...] = mx.random.normal(p.shape) * 0.02
    model.train(train)
    return model


def _loss_and_grads(lean: bool, dtype=None):
    model = _adapted_model(lean, train=True, dtype=dtype)
    tokens = mx.array(np.random.default_rng(0).integers(0, 40000, (2, 65)), dtype=mx.int32)

    def loss(m):
        return nn.losses.cross_entropy(m(tokens[:, :-1]).astype(mx.float32), tokens[:, 1:]).mean()

    mx.random.seed(1)  # the same dropout masks for both
    value, grads = nn.value_and_grad(model, loss)(model)
    return model, value.item(), dict(tree_flatten(grads))


def test_same_loss_and_gradients_as_mlx_lm_layers_with_dropout(embedded_dir, monkeypatch):
    monkeypatch.setattr(lean, "FUSE_GATE_UP", True)  # fused gate + up, as on CUDA (the default there only)
    monkeypatch.setattr(lean, "FUSE_QKV", True)  # one matmul for the frozen q, k and v, as on CUDA
    model, l_lean, g_lean = _loss_and_grads(lean=True)
    assert any(type(m) is LeanLoRALinear for _, m in model.named_modules())
    assert any(isinstance(m, LeanSwiGLUMLP) and m._gate_up is not None for _, m in model.named_modules())
    attn = model.layers[0].self_attn
    assert type(attn.k_proj) is SharedProductLinear and type(attn.q_proj.linear) is SharedProductLinear
    assert attn.k_proj._shared._x is None  # the block's product was let go after its last reader
    _, l_stock, g_stock = _loss_and_grads(lean=False)
    assert g_lean.keys() == g_stock.keys() and len(g_lean) > 0
    assert abs(l_lean - l_stock) < 1e-5 * abs(l_stock)
    for k in g_stock:
        scale = mx.abs(g_stock[k]).max().item()
        assert scale > 0, k
        assert mx.abs(g_lean[k] - g_stock[k]).max().item() < 1e-4 * scale, k


def test_in_bfloat16_gradients_are_as_accurate_as_mlx_lm_layers(embedded_dir):
    # Lean training runs the low-rank products in the activations' dtype (the adapters, their gradients and
    # the optimizer stay float32). Against float32 gradients, its bf16 gradients are off no more than
    # mlx-lm's own layers in bf16 are (measured: median 3.8% against 4.0% of each tensor's largest value).
    _, _, g_exact = _loss_and_grads(lean=False)
    errors = {}
    for use_lean in (True, False):
        _, _, g = _loss_and_grads(lean=use_lean, dtype=mx.bfloat16)
        assert all(v.dtype == mx.float32 for v in g.values())
        errors[use_lean] = np.array([(mx.abs(g[k] - g_exact[k]).max() / mx.abs(g_exact[k]).max()).item()
                                 for k in g_exact])
    assert np.median(errors[True]) < 1.25 * np.median(errors[False])
    assert errors[True].max() < 1.25 * errors[False].max()


def test_fused_projections_take_no_extra_memory(embedded_dir, monkeypatch):
    monkeypatch.setattr(lean, "FUSE_GATE_UP", True)
    monkeypatch.setattr(lean, "FUSE_QKV", True)
    cfg = Config()
    model, _, _ = load_model(cfg.model)
    mx.eval(model.parameters())
    gc.collect()
    before = mx.get_active_memory()
    apply_lora(model, cfg.lora, lean=True)
    mx.eval(model.parameters())
    gc.collect()
    mlp = model.layers[0].mlp
    assert isinstance(mlp, LeanSwiGLUMLP)
    assert mx.array_equal(mlp._gate_up[:mlp.gate_proj.weight.shape[0]], mlp.gate_proj.weight).item()
    attn = model.layers[0].self_attn
    assert type(attn.k_proj) is SharedProductLinear
    adapters = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    # Copies of gate and up would add ~100 MB here, and of q, k and v more: the layers' weights are views into
    # the fused ones.
    assert mx.get_active_memory() - before < adapters + 2_000_000


def test_inference_and_parameter_names_are_unchanged(embedded_dir):
    lean = _adapted_model(lean=True, train=False)
    stock = _adapted_model(lean=False, train=False)
    assert all(isinstance(m, LoRALinear) for _, m in lean.named_modules() if type(m) is LeanLoRALinear)
    assert sorted(k for k, _ in tree_flatten(lean.parameters())) == sorted(k for k, _ in tree_flatten(stock.parameters()))
    tokens = mx.array([[1, 2, 3, 4, 5]])
    assert mx.allclose(lean(tokens), stock(tokens), atol=1e-5).item()


# In a process of its own, so that no other test's arrays count towards the peak.
MEASURE = """
import json
import numpy as np
import engine
import mlx.core as mx, mlx.optimizers as optim
from engine.model import lean
from engine.model.adapters import apply_lora
from engine.config.schema import Config
from engine.train.losses import loss_inputs
from engine.model.loading import load_model
from engine.train.step import accumulate_gradients, build_micro_step, build_update
cfg = Config()
model, _, _ = load_model(cfg.model)
apply_lora(model, cfg.lora, lean={lean})
model.train()
opt = optim.AdamW(learning_rate=1e-4)
step, update = build_micro_step(model, opt), build_update(model, opt)
tokens = np.random.default_rng(0).integers(0, 40000, (2, 513)).astype(np.int32)
batch = loss_inputs(tokens[:, :-1], tokens[:, 1:], np.ones((2, 512), bool))
base = mx.get_active_memory()
for _ in range(2):
    grads, loss = accumulate_gradients(step, iter([batch]))
    update(grads)
    mx.eval(loss, model.parameters(), opt.state)
print(json.dumps({{"peak": mx.get_peak_memory() - base}}))
"""


def test_a_training_step_takes_less_memory(embedded_dir):
    peaks = {}
    for use_lean in (False, True):
        r = subprocess.run([sys.executable, "-c", MEASURE.format(lean=use_lean)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[use_lean] = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    print(f"step memory above the weights: stock {peaks[False] / 1e9:.2f} GB, lean {peaks[True] / 1e9:.2f} GB")
    assert peaks[True] < 0.9 * peaks[False]  # 0.84x measured: the logits and attention probabilities stay


def test_gpu_memory_limit_follows_the_config(monkeypatch):
    from engine.model import memory
    monkeypatch.setattr(memory, "fused_attention", lambda: True)  # as on CUDA
    shape = ModelShape(layers=32, hidden=4096, kv_dim=1024, intermediate=14336, heads=32, vocab=32768)
    plain, ckpt, quantized = (estimate_step_memory(shape, 14_500_000_000, 6_815_744, 2, 2048, 1.0, c, 2, True,
                                                   quantized=q)
                              for c, q in ((False, False), (True, False), (False, True)))
    assert gpu_memory_limit(plain, 0.0) is None  # on this CPU: MLX's default stays
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # no GPU here: pretend, for the arithmetic
    # CUDA, a 16-bit base without checkpointing: the limit is the estimate (Mistral-7B shape, q/v: ~30 GB, where
    # the H100 ran at full speed), also with checkpointing on q/v; 15% above it with checkpointing on all seven layers,
    # with a quantized base and on Metal.
    assert gpu_memory_limit(plain, 0.0) == plain.total and 29e9 < plain.total < 31.5e9
    assert gpu_memory_limit(ckpt, 0.0) == ckpt.total
    seven = AdapterPlacement(32, 3 * 4096 + 14336, 0)  # q/k/v's input, o's, gate/up's, down's
    ckpt_seven = estimate_step_memory(shape, 14_500_000_000, 41_943_040, 2, 2048, 1.0, True, 2, True, seven)
    assert gpu_memory_limit(ckpt_seven, 0.0) == int(ckpt_seven.total * 1.15)
    assert gpu_memory_limit(quantized, 0.0) == int(quantized.total * 1.15)
    assert gpu_memory_limit(plain, 30.0) == 30_000_000_000
    monkeypatch.setattr(memory, "fused_attention", lambda: False)  # as on Metal
    metal = estimate_step_memory(shape, 14_500_000_000, 6_815_744, 2, 2048, 1.0, False, 2, True)
    assert gpu_memory_limit(metal, 0.0) == int(metal.total * 1.15)
    assert gpu_memory_limit(None, 0.0) is None


@pytest.mark.parametrize("keep", [0.9, 1.0])
def test_lora_branch_gradients_equal_the_plain_formula_whole_and_split_by_tokens(keep, monkeypatch):
    # y + scale * dropout(x) @ a @ b, the sum made in addmm's epilogue; the adapter gradients also as a split-K
    # over token chunks (lean.SPLIT_TOKENS), which must give the same numbers.
    mx.random.seed(0)
    y, x, w = mx.random.normal((2, 32, 24)), mx.random.normal((2, 32, 40)), mx.random.normal((2, 32, 24))
    a, b = mx.random.normal((40, 4)), mx.random.normal((4, 24))
    mask = mx.random.bernoulli(keep, x.shape) if keep < 1 else mx.array(True)

    def plain(y, x, a, b):
        return y + 2.0 * (((mask * x) / keep if keep < 1 else x) @ a) @ b

    expected = mx.grad(lambda *p: (plain(*p) * w).sum(), argnums=(0, 1, 2, 3))(y, x, a, b)
    assert mx.allclose(lean.lora_branch(keep, 2.0, True)(y, x, a, b, mask), plain(y, x, a, b),
                       rtol=1e-5, atol=1e-5).item()
    for split in (0, 4):
        monkeypatch.setattr(lean, "SPLIT_TOKENS", split)
        branch = lean.lora_branch(keep, 2.0, True)
        got = mx.grad(lambda y, x, a, b: (branch(y, x, a, b, mask) * w).sum(), argnums=(0, 1, 2, 3))(y, x, a, b)
        for name, g, e in zip("yxab", got, expected):
            assert mx.allclose(g, e, rtol=1e-4, atol=1e-4).item(), (name, split)


def _value_and_gradients(branch, mask, y, x, a, b, w):
    """A lora_branch's weighted sum and its gradients in y, x, a and b."""
    def loss(y, x, a, b):
        return (branch(y, x, a, b, mask) * w).astype(mx.float32).sum()
    return [loss(y, x, a, b), *mx.grad(loss, argnums=(0, 1, 2, 3))(y, x, a, b)]


def _assert_seeded_equals_stored(draw, keep, seed, y, x, a, b, w):
    """The seeded branch against the branch given the mask `draw` makes from that seed: the same value and
    gradients, bit for bit. Returns the seeded run."""
    stored = _value_and_gradients(lean.lora_branch(keep, 2.0, True), draw(seed, x, keep), y, x, a, b, w)
    seeded = _value_and_gradients(lean.lora_branch(keep, 2.0, True, seeded=True), seed, y, x, a, b, w)
    for name, got, want in zip(["value", "y", "x", "a", "b"], seeded, stored):
        assert mx.array_equal(got, want).item(), name
    return seeded


@pytest.mark.skipif(not on_cuda(), reason="Philox masks run on CUDA only (the test below stands in for them)")
def test_on_cuda_the_seeded_branch_equals_the_branch_with_its_stored_mask():
    # The seeded branch keeps two int32 instead of the mask and draws it again in the backward pass: the
    # same value and gradients, bit for bit, as the branch given the mask that seed stands for.
    from engine.model.philox import philox_mask
    mx.random.seed(0)
    y, x, w = (mx.random.normal((2, 64, n)).astype(mx.bfloat16) for n in (48, 40, 48))
    a, b = mx.random.normal((40, 4)), mx.random.normal((4, 48))
    _assert_seeded_equals_stored(philox_mask, 0.9, mx.array([7, 11], dtype=mx.int32), y, x, a, b, w)


def _keyed_stand_in(seed, like, keep):
    """Off CUDA, in place of the Philox kernel: a Bernoulli draw keyed by both words of the seed (compile-safe)."""
    return mx.random.bernoulli(keep, like.shape, key=seed.astype(mx.uint32))


def test_the_seeded_branch_draws_the_same_mask_in_both_passes(monkeypatch):
    # The stand-in runs the branch's own logic here (the test above runs the real kernel on a GPU): a backward
    # pass that drew another mask would change the x, a and b gradients.
    monkeypatch.setattr(lean, "philox_mask", _keyed_stand_in)
    mx.random.seed(0)
    y, x, w = mx.random.normal((2, 16, 24)), mx.random.normal((2, 16, 40)), mx.random.normal((2, 16, 24))
    a, b = mx.random.normal((40, 4)), mx.random.normal((4, 24))
    seed = mx.array([5, 9], dtype=mx.int32)
    seeded = _assert_seeded_equals_stored(_keyed_stand_in, 0.8, seed, y, x, a, b, w)
    another = _value_and_gradients(lean.lora_branch(0.8, 2.0, True, seeded=True), seed + 1, y, x, a, b, w)
    assert not mx.allclose(another[2], seeded[2]).item()  # another seed, another mask: the stand-in uses it


def test_as_if_on_cuda_a_model_keeping_seeds_trains_exactly_as_one_keeping_masks(embedded_dir, monkeypatch):
    # The whole path on the embedded model, with CUDA's choices made here: LeanLoRALinear keeps seeds (two
    # draws an adapter) or masks (one), from the same random stream, for the same loss and gradients.
    from engine.model import philox
    draws = []

    def counted(seed, like, keep):
        draws.append(1)
        return _keyed_stand_in(seed, like, keep)

    monkeypatch.setattr(philox, "on_cuda", lambda: True)
    monkeypatch.setattr(philox, "philox_mask", counted)
    monkeypatch.setattr(lean, "philox_mask", counted)
    runs = {}
    for seeded in (True, False):
        monkeypatch.setattr(lean, "SEEDED_DROPOUT", seeded)
        draws.clear()
        model, loss, grads = _loss_and_grads(lean=True)
        runs[seeded] = loss, grads, len(draws)
    adapters = sum(type(m) is LeanLoRALinear for _, m in model.named_modules())
    assert runs[True][2] == 2 * adapters and runs[False][2] == adapters
    assert runs[True][0] == runs[False][0]
    for k, g in runs[False][1].items():
        assert mx.array_equal(runs[True][1][k], g).item(), k
    with philox.dropout_keys(mx.random.key(0)):  # a checkpointed block: its recompute must redraw the same
        assert philox.dropout_seed() is None     # masks from the block's key, so no seed is kept there
    assert philox.dropout_seed() is not None


@pytest.mark.skipif(not on_cuda(), reason="the SwiGLU gradient kernel is CUDA only")
def test_on_cuda_the_swiglu_kernel_gives_the_gradient_of_the_ops():
    # swiglu_pair's backward by the kernel (float32 arithmetic, one rounding) against the same gradient by MLX's
    # ops in float32 on the same bf16 inputs: within a bf16 rounding, on a width that is not a power of two.
    from engine.model import swiglu_cuda
    mx.random.seed(0)
    gate_up, cotangent = mx.random.normal((3, 40, 2 * 136)) * 3, mx.random.normal((3, 40, 136))
    gate_up, cotangent = gate_up.astype(mx.bfloat16), cotangent.astype(mx.bfloat16)
    assert swiglu_cuda.applies(gate_up, cotangent)
    got = swiglu_cuda.swiglu_pair_grad(gate_up, cotangent).astype(mx.float32)
    _, want = mx.vjp(lambda g: lean.swiglu_pair(g), [gate_up.astype(mx.float32)], [cotangent.astype(mx.float32)])
    assert got.shape == gate_up.shape
    assert mx.allclose(got, want[0], rtol=1e-2, atol=1e-2).item()
    # and through the custom VJP, as training takes it
    _, through = mx.vjp(lean.swiglu_pair, [gate_up], [cotangent])
    assert mx.array_equal(through[0].astype(mx.float32), got).item()
