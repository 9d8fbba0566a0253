"""The adapted MLP of a checkpointed block (engine/model/checkpointed_lora_mlp.py): its backward pass recomputes
gate, up and the SwiGLU in row chunks; its output and every gradient (the input's, each adapter's factors') must
be autograd's through the plain layers, with the same dropout masks (drawn from the same block key)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from engine.config.schema import Config
from engine.model import checkpointed_lora_mlp, checkpointed_mlp
from engine.model.adapters import apply_lora
from engine.model.lean import LeanSwiGLUMLP
from engine.model.loading import load_model, on_cuda
from engine.model.philox import dropout_keys

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted_mlp(targets, dropout, dtype="float32"):
    cfg = Config()
    cfg.lora.target_modules, cfg.lora.dropout, cfg.lora.num_layers = targets, dropout, 2
    cfg.model.dtype = dtype
    cfg.model.quantized_base = "dequantize"  # a plain base (a GPU would keep the embedded Q4_1 one quantized)
    model, _, _ = load_model(cfg.model)
    apply_lora(model, cfg.lora)
    model.train()
    mx.random.seed(3)  # trained-looking adapters: lora_b starts at 0, where lora_a's gradient would be 0
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    mlp = model.layers[-1].mlp
    assert isinstance(mlp, LeanSwiGLUMLP)
    return mlp


def output_and_gradients(mlp, x, cotangent, key):
    """The MLP's output, and the gradients of sum(output * cotangent) for x and each adapter factor, with the
    masks drawn from `key` as inside a checkpointed block."""
    def loss(params, v):
        mlp.update(params)
        with dropout_keys(key):
            y = mlp(v)
        return (y * cotangent).sum(), y

    (_, y), (grads, dx) = mx.value_and_grad(loss, argnums=(0, 1))(mlp.trainable_parameters(), x)
    return y, {"x": dx, **dict(tree_flatten(grads))}


@pytest.mark.parametrize("targets,dropout,chunks,dtype", [
    (SEVEN, 0.2, 1, "float32"), (SEVEN, 0.2, 3, "float32"), (SEVEN, 0.0, 2, "float32"),
    (["q_proj", "v_proj", "down_proj"], 0.2, 2, "float32"), (["gate_proj", "up_proj"], 0.2, 2, "float32"),
    (SEVEN, 0.2, 2, "bfloat16")],
    ids=["seven-1-chunk", "seven-3-chunks", "seven-no-dropout", "down-only", "gate-up-only", "seven-bf16"])
def test_output_and_gradients_are_autograds_through_the_plain_layers(embedded_dir, monkeypatch, targets, dropout,
                                                                       chunks, dtype):
    """In bfloat16 (a GPU's activations; the factors stay float32 and the low-rank products run in bf16) the
    two paths round differently, so the bound is bf16's: 1% of each gradient's largest value."""
    mlp = adapted_mlp(targets, dropout, dtype)
    rng = np.random.default_rng(0)
    hidden = getattr(mlp.down_proj, "linear", mlp.down_proj).weight.shape[0]
    x = mx.array(rng.normal(size=(2, 35, hidden)).astype(np.float32)).astype(getattr(mx, dtype))  # 70 rows
    cotangent = mx.array(rng.normal(size=x.shape).astype(np.float32)).astype(x.dtype)
    # bf16: 0.3-0.5% measured; float32 on CUDA: MLX multiplies in TF32 there (1.2e-4 measured on an H100)
    tolerance = (1e-3 if on_cuda() else 1e-4) if dtype == "float32" else 1e-2
    key = mx.random.key(11)
    monkeypatch.setattr(checkpointed_lora_mlp, "CHECKPOINTED_LORA_MLP", False)
    want_y, want = output_and_gradients(mlp, x, cotangent, key)  # the plain layers
    monkeypatch.setattr(checkpointed_lora_mlp, "CHECKPOINTED_LORA_MLP", True)
    monkeypatch.setattr(checkpointed_mlp, "CHUNKS", chunks)
    assert checkpointed_lora_mlp.applies(mlp)
    got_y, got = output_and_gradients(mlp, x, cotangent, key)
    assert got_y.dtype == want_y.dtype == x.dtype
    assert (mx.abs(got_y - want_y).max().item()  # the same masks: the same output
            < tolerance / 10 * mx.abs(want_y).max().item())
    assert set(got) == set(want) and len(want) == 1 + 2 * sum(t.endswith(("gate_proj", "up_proj", "down_proj"))
                                                              for t in targets)
    for name, w in want.items():
        scale = mx.abs(w).max().item()
        assert scale > 0, name
        assert got[name].dtype == w.dtype, name
        assert mx.abs(got[name] - w).max().item() < tolerance * scale, name
    if dropout:  # the masks matter: another key gives another output
        other_y, _ = output_and_gradients(mlp, x, cotangent, mx.random.key(12))
        assert not mx.allclose(other_y, got_y, rtol=1e-3).item()


def test_applies_only_to_adapted_bias_free_projections(embedded_dir, monkeypatch):
    monkeypatch.setattr(checkpointed_lora_mlp, "CHECKPOINTED_LORA_MLP", True)
    assert not checkpointed_lora_mlp.applies(adapted_mlp(["q_proj", "v_proj"], 0.0))  # nothing adapted in the MLP
    assert checkpointed_lora_mlp.applies(adapted_mlp(SEVEN, 0.0))
    monkeypatch.setattr(checkpointed_lora_mlp, "CHECKPOINTED_LORA_MLP", None)  # None: CUDA only
    assert checkpointed_lora_mlp.applies(adapted_mlp(SEVEN, 0.0)) == on_cuda()
