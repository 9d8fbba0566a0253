"""The head's loss in chunks with its gradient taken in the forward pass (losses.CE_CHUNK_BYTES): the same loss
and gradients as autograd through the whole head, at a lower peak."""

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.config.schema import Config, ModelConfig
from engine.model import cpu_kernels
from engine.model.adapters import apply_lora
from engine.model.loading import load_model
from engine.train import losses
from engine.train.losses import loss_inputs, masked_loss


def _model(name: str):
    cfg = Config()
    cfg.lora.rank, cfg.lora.num_layers, cfg.lora.dropout = 8, 2, 0.0
    model, _, _ = load_model(ModelConfig(name=name))
    apply_lora(model, cfg.lora)
    model.train()
    return model


def _batch(vocab: int, rows: int, length: int, prompt: int):
    tokens = np.random.default_rng(0).integers(0, min(vocab, 40000), (rows, length + 1)).astype(np.int32)
    mask = np.ones((rows, length), bool)
    mask[:, :prompt] = False  # prompt masking: the trained positions are a subset, padded with weight 0
    return loss_inputs(tokens[:, :-1], tokens[:, 1:], mask)


def _loss_and_grads(model, batch, in_forward: bool):
    fn = nn.value_and_grad(model, lambda *a: masked_loss(*a, gradient_in_forward=in_forward))
    (loss, count), grads = fn(model, *batch)
    mx.eval(loss, grads)
    return loss.item(), count.item(), dict(tree_flatten(grads))


def _assert_same(got, want):
    assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == want[1]
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        scale = float(np.abs(np.array(grad)).max()) + 1e-12
        assert float(np.abs(np.array(got[2][name]) - np.array(grad)).max()) / scale < 1e-4, name


@pytest.mark.parametrize("which", ["embedded (tied head)", "tiny Mistral (own lm_head)"])
def test_chunked_head_gives_autograds_loss_and_gradients(which, embedded_dir, mistral_dir, monkeypatch):
    model = _model("embedded" if which.startswith("embedded") else str(mistral_dir))
    batch = _batch(model.args.vocab_size, 3, 48, 5)  # 129 trained rows, padded to 192
    want = _loss_and_grads(model, batch, False)
    # 64-row chunks: three of them, the last all padding
    monkeypatch.setattr(losses, "CE_CHUNK_BYTES", 64 * model.args.vocab_size * 4)
    _assert_same(_loss_and_grads(model, batch, True), want)


def test_preference_sequence_logps_take_any_rows_cotangent_through_the_chunks(embedded_dir, monkeypatch):
    # A preference loss weighs each sequence's log-prob by its own factor (DPO's sigmoid, KTO's weights): the
    # chunked head must scale each row's kept gradient by the cotangent that row gets, not by a constant.
    from engine.train.losses import sequence_logps
    model = _model("embedded")
    inputs, targets, positions, weights = _batch(model.args.vocab_size, 4, 40, 6)
    rows = positions // 40
    factors = mx.array([1.0, -2.0, 0.5, 3.0])

    def result(in_forward: bool):
        def loss(m):
            logps, counts = sequence_logps(m, inputs, targets, positions, weights, rows, in_forward)
            return (nn.log_sigmoid(logps[:2] * factors[:2] - logps[2:] * factors[2:]).sum() + logps[0] ** 2 / counts[0],
                    counts.sum())
        (value, count), grads = nn.value_and_grad(model, loss)(model)
        mx.eval(value, grads)
        return value.item(), count.item(), dict(tree_flatten(grads))

    want = result(False)
    monkeypatch.setattr(losses, "CE_CHUNK_BYTES", 64 * model.args.vocab_size * 4)  # 64-row chunks
    _assert_same(result(True), want)


def test_a_trained_head_keeps_autograd_through_the_whole_head(mistral_dir, monkeypatch):
    # The chunks take no gradient for the head's weight: a run that trains the head must not lose it.
    model = _model(str(mistral_dir))
    model.lm_head.unfreeze()
    batch = _batch(model.args.vocab_size, 2, 40, 4)
    want = _loss_and_grads(model, batch, False)
    monkeypatch.setattr(losses, "CE_CHUNK_BYTES", 64 * model.args.vocab_size * 4)
    got = _loss_and_grads(model, batch, True)
    assert "lm_head.weight" in got[2]
    _assert_same(got, want)


def test_chunked_head_lowers_a_training_steps_peak(embedded_dir, monkeypatch):
    # The embedded model's 49k vocabulary over 1,280 trained rows: 252 MB of float32 logits a copy, which autograd
    # through the whole head keeps several of. The compiled step TrainingRun uses, whole head against chunks
    # (measured alone: 1.45 against 0.99 GB with MLX's loss; 1.19 against 1.06 with the CPU's loss primitive).
    from mlx.optimizers import AdamW

    from engine.train.step import build_micro_step
    model = _model("embedded")
    batch = _batch(model.args.vocab_size, 4, 320, 0)
    logits_copy = 1280 * model.args.vocab_size * 4

    def peak(chunk_bytes: int) -> int:
        monkeypatch.setattr(losses, "CE_CHUNK_BYTES", chunk_bytes)
        step = build_micro_step(model, AdamW(learning_rate=1e-5))
        mx.eval(step(*batch))
        mx.synchronize()
        mx.reset_peak_memory()
        mx.eval(step(*batch))
        return mx.get_peak_memory()

    default = losses.CE_CHUNK_BYTES
    with_kernel = peak(0), peak(default)  # the CPU's loss primitive keeps only the logits and their gradient
    monkeypatch.setattr(cpu_kernels, "USE_KERNELS", False)  # MLX's own loss, as GPUs run it
    whole, chunked = peak(0), peak(default)
    assert chunked < whole - logits_copy, (whole / 1e9, chunked / 1e9)
    assert with_kernel[1] < with_kernel[0], with_kernel


def test_the_estimate_counts_one_chunk_of_logits_where_the_step_and_the_limit_take_chunks(mistral_dir, monkeypatch):
    # What memory.estimate_step_memory counts for the head (bench/RESULTS.md, ninth session): on a GPU a plain
    # step's automatic limit was calibrated on every trained row's logits, a checkpointed one on the chunks; a
    # head the step does not chunk (trained), and KTO's z0 forward, count every row.
    model = _model(str(mistral_dir))
    chunk = losses.head_chunk_rows(model.args.vocab_size, 2)
    monkeypatch.setattr(losses, "on_gpu", lambda: True)
    assert losses.estimated_logit_rows(model, 2, grad_checkpoint=False) is None
    assert losses.estimated_logit_rows(model, 2, grad_checkpoint=True) == chunk
    assert losses.estimated_logit_rows(model, 2, grad_checkpoint=True, method="dpo") == chunk
    assert losses.estimated_logit_rows(model, 2, grad_checkpoint=True, method="kto") is None
    monkeypatch.setattr(losses, "on_gpu", lambda: False)
    assert losses.estimated_logit_rows(model, 2, grad_checkpoint=False) == chunk
    model.lm_head.unfreeze()
    assert losses.estimated_logit_rows(model, 2, grad_checkpoint=False) is None
