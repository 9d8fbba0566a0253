"""The just-in-time dequantizing QLoRA layer gives the same outputs and adapter gradients as MLX's
QuantizedLinear on a real model (the embedded one, kept 4-bit), and keeps the base frozen."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.model.adapters import apply_lora, total_count
from engine.config.schema import Config
from engine.model.loading import load_model
from engine.model import lean
from engine.model.qlora import DequantizingLinear, SharedDequantizingLinear, dequantize_just_in_time


@pytest.mark.parametrize("dense_forward,fused", [(True, False), (False, False), (True, True)],
                         ids=["dense-forward", "quantized-forward", "dense-forward-shared-qkv"])
def test_same_loss_and_adapter_gradients_as_quantized_matmul(embedded_dir, dense_forward, fused, monkeypatch):
    """`fused`: q, k and v dequantized and multiplied as one (lean.FUSE_QKV_QUANTIZED, off by default)."""
    monkeypatch.setattr(lean, "FUSE_QKV_QUANTIZED", fused)
    cfg = Config()
    cfg.model.quantized_base = "keep"
    cfg.lora.rank, cfg.lora.num_layers, cfg.lora.dropout = 4, 2, 0.0
    model, _, info = load_model(cfg.model)
    assert info.quantized
    apply_lora(model, cfg.lora)
    mx.random.seed(0)
    for _, p in tree_flatten(model.trainable_parameters()):  # non-zero B, so every gradient path is used
        p[...] = mx.random.normal(p.shape) * 0.02
    tokens = mx.array(np.random.default_rng(0).integers(0, 40000, (2, 33)), dtype=mx.int32)

    def loss(m):
        logits = m(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    before = tree_flatten(model.trainable_parameters())
    counted = total_count(model)  # the run's "N of M parameters trainable"
    l1, g1 = nn.value_and_grad(model, loss)(model)
    swapped = dequantize_just_in_time(model, dense_forward)
    assert total_count(model) == counted > 100_000_000  # the swapped layers still count, unpacked
    assert swapped > 0 and not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert any(isinstance(m, DequantizingLinear) for _, m in model.named_modules())
    assert (type(model.layers[0].self_attn.k_proj) is SharedDequantizingLinear) == fused
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == [k for k, _ in before]
    l2, g2 = nn.value_and_grad(model, loss)(model)
    assert abs(l1.item() - l2.item()) < 1e-3 * abs(l1.item())
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=2e-2, atol=1e-5, err_msg=k)


def test_dora_layers_keep_their_quantized_base_and_train_the_same(embedded_dir):
    """mlx-lm's DoRALinear dequantizes its base weight only while the base is a QuantizedLinear: swapped for a
    DequantizingLinear it multiplied the input by the packed 4-bit words, and a QLoRA + DoRA run on a GPU (Metal
    or CUDA) failed at its first step with a matmul shape error. The layers without adapters are still swapped."""
    from mlx_lm.tuner.dora import DoRALinear
    cfg = Config()
    cfg.model.quantized_base = "keep"
    cfg.lora.rank, cfg.lora.num_layers, cfg.lora.dropout, cfg.lora.use_dora = 4, 2, 0.0, True
    model, _, info = load_model(cfg.model)
    assert info.quantized
    apply_lora(model, cfg.lora)
    mx.random.seed(0)
    for name, p in tree_flatten(model.trainable_parameters()):  # non-zero B; DoRA's magnitudes m stay the norms
        if name.endswith("lora_b"):
            p[...] = mx.random.normal(p.shape) * 0.02
    tokens = mx.array(np.random.default_rng(0).integers(0, 40000, (2, 33)), dtype=mx.int32)

    def loss(m):
        return nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).mean()

    l1, g1 = nn.value_and_grad(model, loss)(model)
    assert dequantize_just_in_time(model) > 0
    dora = [m for _, m in model.named_modules() if isinstance(m, DoRALinear)]
    assert dora and all(type(m.linear) is nn.QuantizedLinear for m in dora)
    assert type(model.layers[-1].mlp.down_proj) is DequantizingLinear
    l2, g2 = nn.value_and_grad(model, loss)(model)
    assert abs(l1.item() - l2.item()) < 1e-3 * abs(l1.item())
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=2e-2, atol=1e-5, err_msg=k)


def test_generation_shapes_take_the_quantized_kernel_and_agree(embedded_dir):
    cfg = Config()
    cfg.model.quantized_base = "keep"
    model, _, _ = load_model(cfg.model)
    layer = model.layers[0].mlp.up_proj
    x = mx.random.normal((1, 1, layer.scales.shape[1] * layer.group_size)) * 0.1
    for rows in (1, 64):  # one decoding step, then a prefill-sized block through the dense path
        xs = mx.broadcast_to(x, (1, rows, x.shape[-1]))
        expected = layer(xs)
        got = DequantizingLinear(layer)(xs)
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-3, atol=1e-3)


def test_shared_qkv_keeps_the_quantized_weights_as_views(embedded_dir, monkeypatch):
    import gc
    monkeypatch.setattr(lean, "FUSE_QKV_QUANTIZED", True)
    cfg = Config()
    cfg.model.quantized_base = "keep"
    model, _, _ = load_model(cfg.model)
    apply_lora(model, cfg.lora)
    mx.eval(model.parameters())
    gc.collect()
    before = mx.get_active_memory()
    dequantize_just_in_time(model)
    gc.collect()
    attn = model.layers[-1].self_attn
    assert type(attn.q_proj.linear) is SharedDequantizingLinear
    # A copy of every block's q, k and v would add several MB here
    assert mx.get_active_memory() - before < 500_000


def test_biased_layer_matches_quantized_linear_forward_and_backward():
    """Qwen2's q, k and v projections carry a bias: the swapped layer adds it on both paths (prefill-sized and
    decoding rows) and the input's gradient, the one the adapters below it train on, is the quantized layer's."""
    mx.random.seed(1)
    dense = nn.Linear(128, 96, bias=True)
    dense.bias = mx.random.normal((96,))  # large enough that a dropped bias could not pass the bounds below
    q = nn.QuantizedLinear.from_linear(dense, group_size=32, bits=4)
    q.freeze()
    swapped = DequantizingLinear(q)
    assert "bias" in swapped and not swapped.trainable_parameters()
    for rows in (1, 64):
        x = mx.random.normal((1, rows, 128))
        np.testing.assert_allclose(np.array(swapped(x)), np.array(q(x)), rtol=1e-4, atol=1e-4)

        def input_grad(layer):
            return mx.grad(lambda x: (layer(x) ** 2).sum())(x)

        np.testing.assert_allclose(np.array(input_grad(swapped)), np.array(input_grad(q)), rtol=1e-3, atol=1e-3)
