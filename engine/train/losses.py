"""Training losses: the masked SFT loss (cross-entropy on the trained tokens only) and the host-side arrays
it takes, and the sequence log-probs the preference losses (preference.py) are computed from."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.model import cpu_kernels
from engine.model.head import split_head
from engine.model.loading import on_gpu


# MLX's fused cross-entropy (float32 accumulation): on a GPU it reads the bf16 logits as they are, where
# the plain loss made a float32 copy and kept its softmax (bench/RESULTS.md). False: the plain loss, for
# bench/probe_gpu.py's comparison. On the CPU the fused op falls back to reducing in the logits' dtype, so
# the logits are cast to float32 there first.
FUSED_CE = True


# CE_CHUNK_BYTES: with gradient_in_forward, the trained rows go through the head and the softmax in chunks whose
# logits take about this many bytes (rows a multiple of 64), and each chunk's gradient with respect to its hidden
# rows is taken right there, as Liger's fused linear cross-entropy does: the (rows x vocabulary) logits exist one
# chunk at a time, and the backward pass only scales the kept (rows x hidden) gradient by each row's weight. On
# a frozen head that costs no extra product. Measured (bench/RESULTS.md): on the CPU, embedded model, 1,280
# trained rows, the step's peak 2.28 -> 1.82 GB at the same speed; with a 152k vocabulary (Qwen's) 5.29 -> 1.83
# GB. 0: the whole head at once, kept for the backward pass.
CE_CHUNK_BYTES = 32 << 20


def masked_loss(model, inputs, targets, positions, weights, gradient_in_forward: bool = False):
    """(sum of cross-entropies over the trained targets, their count).

    `positions` are the flat indices of trained targets (padded, with weight 0, to a multiple of 64 so the
    compiled step sees few shapes). Where the model splits into trunk + head, only those rows go through
    the vocabulary projection and softmax: with prompt masking that skips most of the largest matmul and
    most of the exps, and the (tokens x vocab) logits never exist for masked positions.
    `gradient_in_forward`: for a training step (see CE_CHUNK_BYTES); evaluation leaves it off, since it
    would compute a gradient nobody takes.
    """
    ce = token_losses(model, inputs, targets, positions, gradient_in_forward) * weights
    return ce.sum(), weights.sum()


def token_losses(model, inputs, targets, positions, gradient_in_forward: bool = False):
    """The cross-entropy (-log p) of each target at the flat `positions`, in float32."""
    head = split_head(model)
    flat_targets = targets.reshape(-1)[positions]
    if head is None:
        logits = model(inputs)
        return _cross_entropy(logits.reshape(-1, logits.shape[-1])[positions], flat_targets)
    hidden = model.model(inputs)
    rows = hidden.reshape(-1, hidden.shape[-1])[positions]
    chunk = head_chunk_rows(model.args.vocab_size, rows.dtype.size)
    if gradient_in_forward and chunk and _frozen(head):
        return _chunked_losses(head, chunk)(rows, flat_targets)[0]
    return _cross_entropy(head(rows), flat_targets)


def head_chunk_rows(vocab: int, itemsize: int) -> int | None:
    """How many trained rows a training step puts through the head at once (CE_CHUNK_BYTES); None: all."""
    return max(64, CE_CHUNK_BYTES // (vocab * itemsize) // 64 * 64) if CE_CHUNK_BYTES else None


def estimated_logit_rows(model, itemsize: int, grad_checkpoint: bool, method: str = "sft") -> int | None:
    """The trained rows whose logits memory.estimate_step_memory counts (its logit_rows); None: all of them.
    A training step puts them through in chunks where the model splits into trunk + frozen head (token_losses).
    Without checkpointing a GPU's estimate still counts them all: the automatic memory limit (a multiple of the
    estimate) was measured that way, and there the chunks saved only ~0.3 GB of a 30 GB step. With checkpointing
    it was measured against the step's live set (bench/RESULTS.md). KTO's z0 forward, in every step, builds
    every row's logits without a gradient: counted whole."""
    head = split_head(model)
    if head is None or not _frozen(head) or method == "kto" or (on_gpu() and not grad_checkpoint):
        return None
    return head_chunk_rows(model.args.vocab_size, itemsize)


def _cross_entropy(logits, targets):
    if FUSED_CE and on_gpu():
        return mx.fast.cross_entropy(logits, targets)
    if FUSED_CE and cpu_kernels.cross_entropy_applies(logits):
        return cpu_kernels.cross_entropy(logits, targets)
    if FUSED_CE:
        return _fusable_cross_entropy(logits.astype(mx.float32), targets)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets)


def _fusable_cross_entropy(logits, targets):
    """logsumexp - the target's logit, from element-wise ops and reductions: on the CPU MLX's logsumexp is
    a scalar kernel, while exp(logits - max) fuses into one built for this CPU (engine/native_jit.py)."""
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = mx.log(mx.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return lse - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def _frozen(head) -> bool:
    """Whether the head (a module, or a tied embedding's bound as_linear) has nothing to train."""
    from mlx.utils import tree_flatten
    module = getattr(head, "__self__", head)
    return not tree_flatten(module.trainable_parameters())


def _chunked_losses(head, chunk: int):
    """A function of (rows, targets) giving (each row's cross-entropy, its gradient in the row), `chunk` rows at
    a time: see CE_CHUNK_BYTES.
    The head is a closure, not an argument: it is frozen, so no gradient reaches it."""
    def row_losses(rows, targets):
        return _cross_entropy(head(rows), targets)

    @mx.custom_function
    def losses(rows, targets):
        parts = []
        for start in range(0, rows.shape[0], chunk):
            r, t = rows[start:start + chunk], targets[start:start + chunk]
            if parts:  # after the chunk before has its loss and gradient: else MLX may hold every chunk's logits
                r = mx.depends(r, list(parts[-1]))
            # a row's loss depends on that row alone: the gradient of the chunk's sum is each row's own
            (loss,), (grad,) = mx.vjp(lambda x: row_losses(x, t), [r], [mx.ones(r.shape[0], mx.float32)])
            parts.append((loss, grad))
        if len(parts) == 1:
            return parts[0]
        return mx.concatenate([p[0] for p in parts]), mx.concatenate([p[1] for p in parts])

    @losses.vjp
    def losses_vjp(primals, cotangents, outputs):
        rows, targets = primals
        scale = cotangents[0][:, None]  # the loss's cotangent; the gradient output is never used downstream
        return (scale * outputs[1]).astype(rows.dtype), mx.zeros_like(targets)

    return losses


def sequence_logps(model, inputs, targets, positions, weights, rows, gradient_in_forward: bool = False):
    """(sum of log p over each sequence's trained targets, their count), per row of `inputs`: the
    sequence log-probs the preference losses compare. `rows` says which sequence each position is in.
    `gradient_in_forward`: for a training step, as masked_loss's (each row's gradient is scaled by whatever
    cotangent the preference loss sends back to that row)."""
    logp = -token_losses(model, inputs, targets, positions, gradient_in_forward) * weights
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
