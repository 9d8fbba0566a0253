"""The frozen MLP of a checkpointed block (engine/model/checkpointed_mlp.py): its backward pass recomputes the
gate + up product in row chunks; the input's gradient must be autograd's through the plain MLP."""

import mlx.core as mx
import numpy as np
import pytest

from engine.config.schema import Config
from engine.model import checkpointed_mlp, lean
from engine.model.adapters import apply_lora
from engine.model.lean import LeanSwiGLUMLP
from engine.model.loading import load_model


@pytest.fixture
def fused_mlp(embedded_dir, monkeypatch):
    monkeypatch.setattr(lean, "FUSE_GATE_UP", True)  # gate + up as one matmul, as on CUDA
    monkeypatch.setattr(checkpointed_mlp, "CHECKPOINTED_MLP", True)
    model, _, _ = load_model(Config().model)
    apply_lora(model, Config().lora)  # q/v: the MLP stays frozen
    model.train()
    mlp = model.layers[-1].mlp
    assert isinstance(mlp, LeanSwiGLUMLP) and checkpointed_mlp.applies(mlp)
    return mlp


@pytest.mark.parametrize("chunks", [1, 3])
def test_input_gradient_is_autograds_through_the_plain_mlp(fused_mlp, chunks, monkeypatch):
    monkeypatch.setattr(checkpointed_mlp, "CHUNKS", chunks)
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(2, 35, fused_mlp.down_proj.weight.shape[0])).astype(np.float32))  # 70 rows
    cotangent = mx.array(rng.normal(size=x.shape).astype(np.float32))
    (want_y,), (want,) = mx.vjp(fused_mlp, [x], [cotangent])  # outside a checkpointed block: plain autograd
    def ours(v):
        return checkpointed_mlp.checkpointed_mlp(fused_mlp, v, lean.swiglu_pair, lean.swiglu_pair_grad)
    (got_y,), (got,) = mx.vjp(ours, [x], [cotangent])
    assert got.shape == x.shape
    assert mx.allclose(got_y, want_y, rtol=1e-5, atol=1e-6).item()
    scale = mx.abs(want).max().item()
    assert scale > 0 and mx.abs(got - want).max().item() < 1e-5 * scale


def test_only_frozen_fused_projections_qualify(embedded_dir, monkeypatch):
    monkeypatch.setattr(checkpointed_mlp, "CHECKPOINTED_MLP", True)
    monkeypatch.setattr(lean, "FUSE_GATE_UP", True)
    cfg = Config()
    cfg.lora.target_modules = ["q_proj", "v_proj", "down_proj"]  # a trained down projection
    model, _, _ = load_model(cfg.model)
    apply_lora(model, cfg.lora)
    assert not checkpointed_mlp.applies(model.layers[-1].mlp)
    monkeypatch.setattr(lean, "FUSE_GATE_UP", False)  # gate and up apart (the CPU's default)
    model, _, _ = load_model(cfg.model)
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    apply_lora(model, cfg.lora)
    assert not checkpointed_mlp.applies(model.layers[-1].mlp)
