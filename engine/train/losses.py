"""Training losses: the masked SFT loss (cross-entropy on the trained tokens only) and the host-side arrays
it takes, and the sequence log-probs the preference losses (preference.py) are computed from."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.model.head import split_head
from engine.model.loading import on_gpu


# MLX's fused cross-entropy (float32 accumulation): on a GPU it reads the bf16 logits as they are, where
# the plain loss made a float32 copy and kept its softmax (bench/RESULTS.md). False: the plain loss, for
# bench/probe_gpu.py's comparison. On the CPU the fused op falls back to reducing in the logits' dtype, so
# the logits are cast to float32 there first.
FUSED_CE = True


def masked_loss(model, inputs, targets, positions, weights):
    """(sum of cross-entropies over the trained targets, their count).

    `positions` are the flat indices of trained targets (padded, with weight 0, to a multiple of 64 so the
    compiled step sees few shapes). Where the model splits into trunk + head, only those rows go through
    the vocabulary projection and softmax: with prompt masking that skips most of the largest matmul and
    most of the exps, and the (tokens x vocab) logits never exist for masked positions.
    """
    ce = token_losses(model, inputs, targets, positions) * weights
    return ce.sum(), weights.sum()


def token_losses(model, inputs, targets, positions):
    """The cross-entropy (-log p) of each target at the flat `positions`, in float32."""
    head = split_head(model)
    flat_targets = targets.reshape(-1)[positions]
    if head is not None:
        hidden = model.model(inputs)
        logits = head(hidden.reshape(-1, hidden.shape[-1])[positions])
    else:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[positions]
    if FUSED_CE and on_gpu():
        return mx.fast.cross_entropy(logits, flat_targets)
    if FUSED_CE:
        return _fusable_cross_entropy(logits.astype(mx.float32), flat_targets)
    return nn.losses.cross_entropy(logits.astype(mx.float32), flat_targets)


def _fusable_cross_entropy(logits, targets):
    """logsumexp - the target's logit, from element-wise ops and reductions: on the CPU MLX's logsumexp is
    a scalar kernel, while exp(logits - max) fuses into one built for this CPU (engine/native_jit.py)."""
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = mx.log(mx.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return lse - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def sequence_logps(model, inputs, targets, positions, weights, rows):
    """(sum of log p over each sequence's trained targets, their count), per row of `inputs`: the
    sequence log-probs the preference losses compare. `rows` says which sequence each position is in."""
    logp = -token_losses(model, inputs, targets, positions) * weights
    # A masked sum, not a one-hot matmul: MLX runs float32 matmuls as TF32 on CUDA, ~3 digits per token.
    mine = rows[None, :] == mx.arange(inputs.shape[0])[:, None]
    return mx.where(mine, logp[None, :], 0.0).sum(axis=1), mx.where(mine, weights[None, :], 0.0).sum(axis=1)


def trained_positions(mask):
    """(flat indices of the trained targets, weights): numpy, padded with weight 0 to a multiple of 64."""
    import numpy as np
    flat = np.flatnonzero(mask.reshape(-1)).astype(np.int32)
    size = max(64, -(-len(flat) // 64) * 64)
    positions = np.zeros(size, dtype=np.int32)
    positions[:len(flat)] = flat
    weights = np.zeros(size, dtype=np.float32)
    weights[:len(flat)] = 1.0
    return positions, weights


def loss_inputs(inputs, targets, mask):
    """Host-side arrays for masked_loss from a collated batch."""
    positions, weights = trained_positions(mask)
    return mx.array(inputs), mx.array(targets), mx.array(positions), mx.array(weights)
