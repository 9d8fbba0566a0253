"""The CPU primitives (engine/native/): built on first use on Linux x86-64, the attention and the SwiGLU give
MLX's numbers and gradients, the training step routes to them, and where they cannot be built the step keeps
MLX's ops and says why."""

import os
import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.model import cpu_attention, cpu_kernels, lean
from engine.native import build
from helpers import ROOT

LINUX_X86 = sys.platform == "linux" and os.uname().machine == "x86_64"
needs_kernel = pytest.mark.skipif(not LINUX_X86, reason="the primitive is built on Linux x86-64 only")


def _qkv(heads, kv, length, keys, d=32, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(mx.array(rng.standard_normal((batch, h, n, d)), dtype=mx.float32)
                 for h, n in ((heads, length), (kv, keys), (kv, keys)))


def _kernel():
    kernel = cpu_attention.native_kernel()
    assert kernel is not None, build.reason("cpu_attention")
    return kernel


@needs_kernel
@pytest.mark.parametrize("heads,kv,length,keys,causal", [
    (6, 2, 130, 130, True),   # grouped heads; three query blocks, the last of 2 rows
    (4, 4, 64, 64, True),     # one block exactly
    (3, 1, 7, 40, True),      # fewer queries than keys: query i sees keys up to i + 33
    (6, 3, 90, 70 + 20, False),
    (2, 1, 100, 130, True),   # several query blocks, each seeing 30 keys more than its rows
])
def test_the_kernel_gives_mlx_attention_and_gradients(heads, kv, length, keys, causal):
    kernel = _kernel()
    q, k, v = _qkv(heads, kv, length, keys)
    scale = q.shape[-1] ** -0.5
    if causal and keys != length:
        mask = mx.arange(length)[:, None] + (keys - length) >= mx.arange(keys)[None]
    else:
        mask = "causal" if causal else None
    w = mx.array(np.random.default_rng(1).standard_normal(q.shape), dtype=mx.float32)

    def theirs(q, k, v):
        return (mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask) * w).sum()

    def ours(q, k, v):
        return (cpu_attention.native_attention(kernel, q, k, v, scale, causal, 2) * w).sum()

    expected = mx.value_and_grad(theirs, argnums=(0, 1, 2))(q, k, v)
    for got in (mx.value_and_grad(ours, argnums=(0, 1, 2))(q, k, v),
                mx.compile(mx.value_and_grad(ours, argnums=(0, 1, 2)))(q, k, v)):
        assert abs(got[0].item() - expected[0].item()) < 1e-5 * abs(expected[0]).item() + 1e-4
        for a, b in zip(got[1], expected[1]):
            assert mx.abs(a - b).max().item() < 1e-4 * mx.abs(b).max().item()


@needs_kernel
def test_strided_inputs_and_thread_counts_give_the_same_numbers():
    """The model hands over transposed (B, L, H, D) views; one thread or several must agree bit for bit,
    since each key head's gradient is summed by one task in a fixed order."""
    kernel = _kernel()
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((2, 70, h, 16)), dtype=mx.float32).transpose(0, 2, 1, 3)
               for h in (6, 2, 2))  # (B, L, H, D) as (B, H, L, D), as the model's attention hands them over
    got = {n: mx.value_and_grad(lambda q, k, v: cpu_attention.native_attention(kernel, q, k, v, 0.25, True, n)
                                .square().sum(), argnums=(0, 1, 2))(q, k, v) for n in (1, 2, 3)}
    reference = mx.value_and_grad(lambda q, k, v: mx.fast.scaled_dot_product_attention(
        q, k, v, scale=0.25, mask="causal").square().sum(), argnums=(0, 1, 2))(q, k, v)
    for n in (2, 3):
        assert got[n][0].item() == got[1][0].item()
        assert all(mx.array_equal(a, b).item() for a, b in zip(got[n][1], got[1][1]))
    assert abs(got[1][0].item() - reference[0].item()) < 1e-5 * reference[0].item()
    for a, b in zip(got[1][1], reference[1]):
        assert mx.abs(a - b).max().item() < 1e-4 * mx.abs(b).max().item()


@needs_kernel
def test_the_training_route_takes_the_kernel_only_for_its_cases(monkeypatch):
    """float32 with a causal or no mask goes to the kernel; an explicit mask or bf16 keeps MLX's ops."""
    kernel, calls = _kernel(), []

    class Recording:
        def attention(self, *args):
            calls.append(args[4])
            return kernel.attention(*args)

    monkeypatch.setattr(cpu_attention, "native_kernel", Recording)  # a class: native_kernel() gives one
    q, k, v = _qkv(4, 2, 16, 16)
    wide_v = mx.concatenate([v, v], axis=-1)  # values wider than keys (as in MLA): not the kernel's case
    cases = (("causal", mx.float32, True, v), (None, mx.float32, False, v),
             (mx.ones((16, 16), dtype=mx.bool_), mx.float32, None, v), ("causal", mx.bfloat16, None, v),
             ("causal", mx.float32, None, wide_v))
    with cpu_attention.training_attention():
        for mask, dtype, causal, values in cases:
            calls.clear()
            args = [x.astype(dtype) for x in (q, k, values)]
            out = mx.fast.scaled_dot_product_attention(*args, scale=0.2, mask=mask)
            assert calls == ([] if causal is None else [causal])
            theirs = cpu_attention.attention(*args, 0.2, mask)
            assert mx.allclose(out, theirs, atol=1e-2 if dtype == mx.bfloat16 else 1e-5).item()


def test_without_a_compiler_the_step_keeps_mlx_ops_and_says_why(tmp_path):
    """No g++ on PATH (or LORA_TUI_NATIVE=off): native_kernel() is None with a one-line reason, and the
    training route still gives MLX's attention."""
    code = ("import engine, mlx.core as mx\n"
            "from engine.model import cpu_attention as ca\n"
            "from engine.native import build\n"
            "from engine.model import cpu_kernels\n"
            "print(ca.native_kernel() is None); print(cpu_kernels.device_note())\n"
            "q = mx.ones((1, 2, 5, 8)); k = mx.ones((1, 1, 5, 8))\n"
            "with ca.training_attention():\n"
            "    out = mx.fast.scaled_dot_product_attention(q, k, k, scale=1.0, mask='causal')\n"
            "print(out.sum().item())\n")
    for env in ({"PATH": str(tmp_path)}, {"LORA_TUI_NATIVE": "off"}):
        full = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                             check=True).stdout.splitlines()
        assert out[0] == "True"
        if LINUX_X86:  # the run's device line
            assert out[1].startswith(" (MLX ops for attention, swiglu, cross-entropy, rope, rms-norm: ")
            assert ("no g++" in out[1]) if "PATH" in env else ("LORA_TUI_NATIVE=off" in out[1])
        assert float(out[2]) == pytest.approx(1 * 2 * 5 * 8)


@needs_kernel
def test_the_swiglu_primitive_gives_the_ops_numbers_and_the_mlp_takes_it(monkeypatch):
    assert cpu_kernels.kernel("cpu_swiglu") is not None, build.reason("cpu_swiglu")
    rng = np.random.default_rng(3)
    gate, w = (mx.array(rng.standard_normal((3, 37, 101)) * 4, dtype=mx.float32) for _ in range(2))
    up = mx.array(rng.standard_normal((3, 101, 37)), dtype=mx.float32).transpose(0, 2, 1)  # strided
    ours = mx.value_and_grad(lambda g, u: (cpu_kernels.swiglu(g, u) * w).sum(), argnums=(0, 1))(gate, up)
    theirs = mx.value_and_grad(lambda g, u: (lean.swiglu(g, u) * w).sum(), argnums=(0, 1))(gate, up)
    assert abs(ours[0].item() - theirs[0].item()) < 1e-5 * abs(theirs[0].item())
    for a, b in zip(ours[1], theirs[1]):
        assert mx.abs(a - b).max().item() < 1e-5 * mx.abs(b).max().item()

    calls = []
    monkeypatch.setattr(cpu_kernels, "swiglu", lambda g, u: calls.append(g.shape) or lean.swiglu(g, u))
    mlp = lean.LeanSwiGLUMLP(SimpleNamespace(gate_proj=nn.Linear(8, 16, bias=False),
                                             up_proj=nn.Linear(8, 16, bias=False), down_proj=nn.Linear(16, 8)))
    mlp.train()
    mlp(mx.ones((2, 5, 8)))
    assert calls == [(2, 5, 16)]
    mlp.eval()
    mlp(mx.ones((2, 5, 8)))  # not training (generation): MLX's own ops
    assert calls == [(2, 5, 16)]


@needs_kernel
def test_the_cross_entropy_primitive_gives_the_ops_numbers_and_the_loss_takes_it():
    """Against MLX's own cross_entropy, per row and through a head to its input rows (the training loss's
    path on the CPU); unsigned targets too."""
    from engine.train import losses
    assert cpu_kernels.kernel("cpu_cross_entropy") is not None, build.reason("cpu_cross_entropy")
    rng = np.random.default_rng(4)
    logits = mx.array(rng.standard_normal((70, 1001)) * 6, dtype=mx.float32)
    targets = mx.array(rng.integers(0, 1001, 70), dtype=mx.uint32)
    w = mx.array(rng.random(70), dtype=mx.float32)
    ours = mx.value_and_grad(lambda x: (cpu_kernels.cross_entropy(x, targets) * w).sum())(logits)
    theirs = mx.value_and_grad(lambda x: (nn.losses.cross_entropy(x, targets) * w).sum())(logits)
    assert abs(ours[0].item() - theirs[0].item()) < 1e-5 * abs(theirs[0].item())
    assert mx.abs(ours[1] - theirs[1]).max().item() < 1e-5 * mx.abs(theirs[1]).max().item()
    assert cpu_kernels.cross_entropy_applies(logits)
    rows, head = logits[:, :64] / 6, mx.array(rng.standard_normal((1001, 64)), dtype=mx.float32)
    ours = mx.value_and_grad(lambda r: (losses._cross_entropy(r @ head.T, targets) * w).sum())(rows)
    theirs = mx.value_and_grad(lambda r: (nn.losses.cross_entropy(r @ head.T, targets) * w).sum())(rows)
    assert abs(ours[0].item() - theirs[0].item()) < 1e-5 * abs(theirs[0].item())
    assert mx.abs(ours[1] - theirs[1]).max().item() < 1e-4 * mx.abs(theirs[1]).max().item()


@needs_kernel
@pytest.mark.parametrize("traditional", [False, True])  # True: adjacent pairs, as the embedded GGUF model's
def test_the_rope_primitive_gives_mlx_rope_and_the_training_route_takes_it(monkeypatch, traditional):
    """On the transposed view the model hands over, values and gradients as mx.fast.rope's; during a traced
    training step nn.RoPE reaches it, and a case it does not cover (an offset) keeps MLX's rope."""
    assert cpu_kernels.kernel("cpu_rope") is not None, build.reason("cpu_rope")
    rng = np.random.default_rng(5)
    x = mx.array(rng.standard_normal((2, 37, 3, 16)), dtype=mx.float32).transpose(0, 2, 1, 3)
    w = mx.array(rng.standard_normal((2, 3, 37, 16)), dtype=mx.float32)

    def theirs(x, offset=0):
        return mx.fast.rope(x, 16, traditional=traditional, base=10000.0, scale=0.5, offset=offset)

    expected = mx.value_and_grad(lambda x: (theirs(x) * w).sum())(x)
    got = mx.value_and_grad(lambda x: (cpu_kernels.rope(x, 10000.0, 0.5, traditional) * w).sum())(x)
    assert abs(got[0].item() - expected[0].item()) < 1e-4 * abs(expected[0].item()) + 1e-4
    assert mx.abs(got[1] - expected[1]).max().item() < 1e-5 * mx.abs(expected[1]).max().item()

    calls, kernel_rope, original = [], cpu_kernels.rope, mx.fast.rope
    monkeypatch.setattr(cpu_kernels, "rope", lambda *a: calls.append(a[0].shape) or kernel_rope(*a))
    rope, plain, shifted = nn.RoPE(16, traditional, base=10000.0, scale=0.5), theirs(x), theirs(x, offset=3)
    with cpu_attention.training_attention():
        assert mx.allclose(rope(x), plain, atol=1e-5).item() and calls == [x.shape]
        assert mx.allclose(rope(x, offset=3), shifted, atol=1e-5).item() and len(calls) == 1
    assert mx.fast.rope is original  # restored


@needs_kernel
def test_the_rms_norm_primitive_gives_mlx_rms_norm_and_the_training_route_takes_it(monkeypatch):
    """Values and both gradients as mx.fast.rms_norm's, on a strided input, for 1 and 3 threads; during a traced
    training step nn.RMSNorm reaches it, and a bf16 input keeps MLX's norm."""
    assert cpu_kernels.kernel("cpu_rms_norm") is not None, build.reason("cpu_rms_norm")
    rng = np.random.default_rng(6)
    x = mx.array(rng.standard_normal((3, 96, 41)) * 3, dtype=mx.float32).transpose(0, 2, 1)  # (3, 41, 96) strided
    weight, w = (mx.array(rng.standard_normal(shape), dtype=mx.float32) for shape in ((96,), (3, 41, 96)))

    def grads(norm):
        return mx.value_and_grad(lambda x, g: (norm(x, g, 1e-5) * w).sum(), argnums=(0, 1))(x, weight)

    expected = grads(mx.fast.rms_norm)
    for threads in (1, 3):
        monkeypatch.setattr("engine.native.threads", lambda calls_blas=False, _t=threads: _t)
        got = grads(cpu_kernels.rms_norm)
        assert abs(got[0].item() - expected[0].item()) < 1e-5 * abs(expected[0].item())
        for a, b in zip(got[1], expected[1]):
            assert mx.abs(a - b).max().item() < 1e-5 * mx.abs(b).max().item()
    only_x = mx.grad(lambda x: (cpu_kernels.rms_norm(x, weight, 1e-5) * w).sum())(x)  # no weight gradient asked
    assert mx.abs(only_x - expected[1][0]).max().item() < 1e-5 * mx.abs(expected[1][0]).max().item()

    calls, kernel_norm = [], cpu_kernels.rms_norm
    monkeypatch.setattr(cpu_kernels, "rms_norm", lambda *a: calls.append(a[0].shape) or kernel_norm(*a))
    norm = nn.RMSNorm(96, eps=1e-5)
    plain = mx.fast.rms_norm(x, norm.weight, 1e-5)
    with cpu_attention.training_attention():
        assert mx.allclose(norm(x), plain, atol=1e-5).item()
        assert calls == [x.shape]
        norm(x.astype(mx.bfloat16))
        assert len(calls) == 1


@needs_kernel
def test_the_embedded_models_training_step_runs_on_the_kernels(embedded_dir, monkeypatch):
    """Every block's attention, RoPE (the GGUF base's traditional form), SwiGLU and two norms, the final norm and
    the loss go through the primitives in the engine's compiled step (tests/test_cpu_attention.py checks that
    step's numbers)."""
    import mlx.optimizers as optim

    from engine.config.schema import Config
    from engine.model.adapters import apply_lora
    from engine.model.loading import load_model
    from engine.train.step import build_micro_step
    cfg = Config()
    model, _, _ = load_model(cfg.model)
    apply_lora(model, cfg.lora)
    calls = {}
    for name in ("rope", "swiglu", "cross_entropy", "rms_norm"):
        original = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _n=name, _f=original: calls.update(
            {_n: calls.get(_n, 0) + 1}) or _f(*a))
    kernel = _kernel()

    class Counting:
        def attention(self, *args):
            calls["attention"] = calls.get("attention", 0) + 1
            return kernel.attention(*args)

    monkeypatch.setattr(cpu_attention, "native_kernel", Counting)
    tokens = mx.array(np.random.default_rng(0).integers(0, 40000, (2, 65)), dtype=mx.int32)
    step = build_micro_step(model, optim.AdamW(learning_rate=1e-4))
    mx.eval(step(tokens[:, :-1], tokens[:, 1:], mx.arange(40, 128), mx.ones((88,))))
    layers = len(model.model.layers)
    assert calls == {"attention": layers, "rope": 2 * layers, "swiglu": layers, "cross_entropy": 1,
                     "rms_norm": 2 * layers + 1}


@needs_kernel
def test_a_machines_first_cpu_run_names_the_kernel_build_as_a_phase(tmp_path, monkeypatch):
    """Nothing cached (a new machine or MLX): each kernel needs a build, and the run's preparation names that
    wait as a phase before the first step; once they are built, nothing is left to build."""
    from engine.protocol import Phase
    from helpers import run_in_thread, tiny_config
    for name in cpu_kernels.KERNELS:
        assert cpu_kernels.kernel(name) is not None, build.reason(name)
    assert cpu_kernels.to_build() == []
    monkeypatch.setattr(build, "_loaded", {})  # as a new process sees it
    assert cpu_kernels.to_build() == []  # built on this machine: on disk
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cpu_kernels.to_build() == list(cpu_kernels.KERNELS)
    monkeypatch.undo()

    monkeypatch.setattr(build, "needs_build", lambda name: name == "cpu_rope")  # one left, not really compiled
    phases = []
    thread, _, result = run_in_thread(tiny_config(tmp_path, training={"iterations": 1}),
                                      [lambda e: isinstance(e, Phase) and phases.append(e.name)])
    thread.join()
    assert result[0].status == "finished"
    assert "building the CPU kernels (once per machine)" in phases
    assert phases.index("building the CPU kernels (once per machine)") < phases.index("ready")
