#!/usr/bin/env python3
"""The head in chunks for preference training (losses.CE_CHUNK_BYTES): a DPO loss's value and gradient on the
embedded model (float32, CPU), 2 pairs of 512 tokens with 448 trained each, the whole head (0) against the
chunks, alternated twice. Prints the loss and MLX's peak above what was live before the step.

    scripts/run python bench/probe_preference_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import engine  # noqa: F401  (preloads MKL before mlx)
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from engine.config.schema import Config
    from engine.model.adapters import apply_lora
    from engine.model.loading import load_model
    from engine.train import losses
    from engine.train.losses import loss_inputs, sequence_logps
    from engine.train.preference import dpo_loss

    cfg = Config()
    cfg.lora.dropout = 0.0
    model, _, _ = load_model(cfg.model)
    apply_lora(model, cfg.lora)
    model.train()
    rows_, length, prompt = 4, 512, 64  # chosen, chosen, rejected, rejected
    tokens = np.random.default_rng(0).integers(0, 40000, (rows_, length + 1)).astype(np.int32)
    mask = np.ones((rows_, length), bool)
    mask[:, :prompt] = False
    inputs, targets, positions, weights = loss_inputs(tokens[:, :-1], tokens[:, 1:], mask)
    rows, ref = positions // length, mx.zeros(rows_)

    def loss():
        logps, _ = sequence_logps(model, inputs, targets, positions, weights, rows, gradient_in_forward=True)
        return dpo_loss(logps[:2], logps[2:], ref[:2], ref[2:], 0.1)[0].sum()

    step = nn.value_and_grad(model, loss)
    chunked = losses.CE_CHUNK_BYTES
    for chunk_bytes in (0, chunked, 0, chunked):
        losses.CE_CHUNK_BYTES = chunk_bytes
        mx.eval(step())
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        value, grads = step()
        mx.eval(value, grads)
        print(f"CE_CHUNK_BYTES {chunk_bytes}: loss {value.item():.5f}, peak above the weights "
              f"{(mx.get_peak_memory() - before) / 1e9:.3f} GB", flush=True)


if __name__ == "__main__":
    main()
