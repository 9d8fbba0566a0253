"""The CPU training attention (engine/model/cpu_attention.py) gives MLX's attention and its gradients, and
the training step traced with it trains the embedded model to the same loss and adapter gradients; the
-march=native compiler switch (engine/native_jit.py) is on here and can be turned off."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.config.schema import Config
from engine.model import cpu_attention
from engine.model.adapters import apply_lora
from engine.model.loading import load_model
from helpers import ROOT


def _qkv(heads=6, kv=2, length=24, keys=24, d=16):
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((2, h, n, d)), dtype=mx.float32)
               for h, n in ((heads, length), (kv, keys), (kv, keys)))
    return q, k, v


@pytest.mark.parametrize("mask", ["causal", "causal-chunked", None, "bool", "additive", "per-head"])
@pytest.mark.parametrize("heads,kv", [(6, 2), (4, 4)])
def test_attention_and_its_gradients_match_mlx(mask, heads, kv):
    if mask == "causal-chunked":  # 250 tokens: 3 query chunks of 84, 84 and 82 rows
        assert cpu_attention.causal_chunks(250, 250) == 3
        q, k, v = _qkv(heads, kv, length=250, keys=250)
        mask = "causal"
    else:
        q, k, v = _qkv(heads, kv, length=8 if mask == "causal" else 24, keys=24)
    rng = np.random.default_rng(1)
    if mask == "bool":
        mask = mx.array(rng.random((q.shape[2], k.shape[2])) > 0.3)
    elif mask == "additive":
        mask = mx.array(rng.standard_normal((q.shape[2], k.shape[2])), dtype=mx.float32)
    elif mask == "per-head":
        mask = mx.array(rng.standard_normal((2, heads, q.shape[2], k.shape[2])), dtype=mx.float32)
    w = mx.array(rng.standard_normal(q.shape), dtype=mx.float32)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, scale=0.25, mask=mask) * w).sum()

    theirs = mx.value_and_grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    ours = mx.value_and_grad(loss(lambda q, k, v, scale, mask: cpu_attention.attention(q, k, v, scale, mask)),
                             argnums=(0, 1, 2))(q, k, v)
    assert abs(ours[0].item() - theirs[0].item()) < 1e-4 * abs(theirs[0].item())
    for a, b in zip(ours[1], theirs[1]):
        assert mx.abs(a - b).max().item() < 1e-4 * mx.abs(b).max().item()


def test_the_training_step_with_it_trains_as_before(embedded_dir):
    """The engine's compiled step (which routes attention here on the CPU) gives the loss and adapter
    gradients of the same step with MLX's attention."""
    from engine.train.step import build_micro_step
    import mlx.optimizers as optim

    cfg = Config()
    model, _, _ = load_model(cfg.model)
    mx.random.seed(0)
    apply_lora(model, cfg.lora)
    for _, p in tree_flatten(model.trainable_parameters()):
        p[...] = mx.random.normal(p.shape) * 0.02
    model.train()
    tokens = mx.array(np.random.default_rng(0).integers(0, 40000, (2, 49)), dtype=mx.int32)
    positions = mx.arange(20, 96)
    args = (tokens[:, :-1], tokens[:, 1:], positions, mx.ones(positions.shape))

    def step(route: bool):
        from engine.train import losses
        mx.random.seed(1)
        if route:
            return build_micro_step(model, optim.AdamW(learning_rate=1e-4))(*args)
        (loss, n), grads = nn.value_and_grad(model, losses.masked_loss)(model, *args)
        return loss, n, grads

    ours, theirs = step(True), step(False)
    assert mx.fast.scaled_dot_product_attention is not None  # restored after tracing
    assert abs(ours[0].item() - theirs[0].item()) < 1e-5 * abs(theirs[0].item())
    g_ours, g_theirs = dict(tree_flatten(ours[2])), dict(tree_flatten(theirs[2]))
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for k in g_theirs:
        scale = mx.abs(g_theirs[k]).max().item()
        assert scale > 0 and mx.abs(g_ours[k] - g_theirs[k]).max().item() < 1e-3 * scale, k


def test_kernels_are_built_for_this_cpu_unless_turned_off(tmp_path):
    """On Linux x86-64 with g++ the engine puts a -march=native g++ first on PATH; LORA_TUI_NATIVE_JIT=off
    leaves PATH alone. Either way a compiled function gives the same numbers."""
    code = ("import os, engine, mlx.core as mx\n"
            "f = mx.compile(lambda x: mx.exp(x - 1.0) * mx.sigmoid(x))\n"
            "x = mx.linspace(-90, 90, 1001)\n"
            "print(os.environ['PATH'].split(os.pathsep)[0]); print(f(x).sum().item())")
    results = {}
    for switch in ("on", "off"):
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / switch)}
        (tmp_path / switch).mkdir()
        if switch == "off":
            env["LORA_TUI_NATIVE_JIT"] = "off"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        results[switch] = out
    wrapper = tmp_path / "cache" / "lora-tui" / "jit-bin"
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert results["on"][0] == str(wrapper)
        assert "-march=native" in (wrapper / "g++").read_text()
        assert list((tmp_path / "on" / "mlx").rglob("*.so")), "no kernel was built through the wrapper"
    assert results["off"][0] != str(wrapper)
    assert float(results["on"][1]) == pytest.approx(float(results["off"][1]), rel=1e-5)
