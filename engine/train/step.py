"""One optimizer step, in parts: the compiled micro step (forward + backward), gradient accumulation over
micro-batches and ranks, clipping, the compiled update, gradient checkpointing and each step's seed."""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache, partial


@contextmanager
def checkpointed_layers(model, enabled: bool):
    """Gradient checkpointing of every transformer block for one run: each block keeps only its input and
    is recomputed in the backward pass.

    As mlx-lm's grad_checkpoint does, this patches the block's class, so it is put back when the run ends
    (the TUI trains many times in one process). Unlike it, the block's dropout masks come from a key drawn
    before the block (philox.dropout_keys): with mlx-lm's, the recompute draws new masks, and the gradients
    are not those of the loss the forward pass computed (tests/test_train.py)."""
    if not enabled:
        yield
        return
    block_class = type(model.layers[0])
    original = block_class.__call__
    block_class.__call__ = _checkpointed(original)
    try:
        yield
    finally:
        block_class.__call__ = original


def _checkpointed(call):
    import mlx.core as mx

    from engine.model.philox import dropout_keys

    def checkpointed_call(block, *args, **kwargs):
        key = mx.random.randint(0, 2 ** 31 - 1, (2,)).astype(mx.uint32)  # a closure: no gradient for it

        def inner(params, *args, **kwargs):
            block.update(params)
            with dropout_keys(key):
                return call(block, *args, **kwargs)
        return mx.checkpoint(inner)(block.trainable_parameters(), *args, **kwargs)
    return checkpointed_call


def build_micro_step(model, optimizer, vector=None):
    """The compiled forward + backward of one micro-batch: (sum of token losses, token count, grads); with a
    flat_update.ParameterVector the grads come as one vector in its order (for flat_update.FlatUpdate)."""
    import mlx.core as mx
    import mlx.nn as nn

    from engine.model.cpu_attention import training_attention
    from engine.train.losses import masked_loss
    # the head's gradient is taken chunk by chunk in the forward pass (losses.CE_CHUNK_BYTES)
    loss_and_grad = nn.value_and_grad(model, partial(masked_loss, gradient_in_forward=True))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(inputs, targets, positions, weights):
        with training_attention():  # runs while the step is traced (see engine/model/cpu_attention.py)
            (loss_sum, ntoks), grads = loss_and_grad(model, inputs, targets, positions, weights)
        return loss_sum, ntoks, grads if vector is None else vector.flatten(grads)

    return micro_step


def accumulate_gradients(micro_step, micro_batches, world=None):
    """Sum the gradients of several micro-batches (and, in a distributed run, of every rank), then scale by
    the trained-token count, so that the step equals one big batch. micro_batches yields loss_inputs()
    tuples; returns (grads, mean loss)."""
    import mlx.core as mx
    from mlx.utils import tree_map
    grads, loss_sum, ntoks = None, mx.array(0.0), mx.array(0.0)
    for arrays in micro_batches:
        if grads is not None:  # bound memory: one micro-batch graph at a time; the last is left to the
            mx.eval(grads, loss_sum, ntoks)  # caller, which may queue it without waiting (step_queue.py)
        s, n, g = micro_step(*arrays)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss_sum, ntoks = loss_sum + s, ntoks + n
    if world is not None and not world.alone:
        mx.eval(grads, loss_sum, ntoks)  # so that the collective's timing and watchdog see only communication
        grads, loss_sum, ntoks = world.sum((grads, loss_sum, ntoks))  # token-weighted across ranks
    denom = mx.maximum(ntoks, 1)
    return tree_map(lambda g: g / denom, grads), loss_sum / denom


def clip_gradients(grads, max_grad_norm: float):
    """(clipped grads, global norm); max_grad_norm <= 0 only measures the norm. `grads` is a tree, or the one
    vector of a flat update (engine/train/flat_update.py)."""
    import mlx.core as mx
    return _compiled_clip(max_grad_norm if max_grad_norm > 0 else math.inf, isinstance(grads, mx.array))(grads)


@lru_cache(maxsize=None)
def _compiled_clip(max_norm: float, vector: bool):
    import mlx.core as mx
    import mlx.optimizers as optim
    if vector:
        return mx.compile(partial(_clip_vector, max_norm=max_norm))
    return mx.compile(lambda grads: optim.clip_grad_norm(grads, max_norm))


def _clip_vector(v, max_norm: float):
    """optim.clip_grad_norm for one long vector. Its squares are summed by rows of 1,024 first: MLX's CPU sums a
    float32 array in one running total, which over a million values was off by 2e-4 (relative; per array, as
    clip_grad_norm sums a tree, the arrays are short enough)."""
    import mlx.core as mx
    squares, n = v.square(), v.size - v.size % 1024
    norm = mx.sqrt(squares[:n].reshape(-1, 1024).sum(axis=1).sum() + squares[n:].sum())
    return v * mx.minimum(max_norm / (norm + 1e-6), 1.0), norm


def apply_update(model, optimizer, grads) -> None:
    import mlx.core as mx
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)


def build_update(model, optimizer):
    """apply_update, compiled: each parameter's optimizer arithmetic (~10 element-wise ops for AdamW) runs
    as one fused kernel, where run op by op it is ~10 launches for each of a LoRA's hundreds of arrays."""
    import mlx.core as mx
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        optimizer.update(model, grads)
        return optimizer.state["step"]

    def apply(grads) -> None:
        update(grads)
        mx.eval(model.trainable_parameters(), optimizer.state)

    return apply


def build_guarded_update(model, optimizer):
    """build_update for a step whose loss is read later (engine/train/step_queue.py): the new weights and
    optimizer state replace the old only where `healthy` (a bool scalar) holds, and nothing waits: the update
    is queued with mx.async_eval, with whatever else the caller will read (the loss, the norm)."""
    import mlx.core as mx
    from mlx.utils import tree_map
    optimizer.init(model.trainable_parameters())  # the state's leaves exist before the first update (idempotent)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads, healthy):
        old_params = model.trainable_parameters()
        old_state = tree_map(lambda x: x, optimizer.state)  # the same arrays, in a tree the update won't touch
        optimizer.update(model, grads)
        model.update(kept_where(healthy, model.trainable_parameters(), old_params))
        optimizer.state.update(kept_where(healthy, optimizer.state, old_state))  # the same dict: compile tracks it
        return optimizer.state["step"]

    def apply(grads, healthy, *read_later) -> None:
        update(grads, healthy)
        mx.async_eval(model.trainable_parameters(), optimizer.state, healthy, *read_later)

    return apply


def kept_where(healthy, new, old):
    """`new` where `healthy` (a bool scalar) holds, else `old`, leaf by leaf (trees or single arrays): what a
    guarded update leaves behind."""
    import mlx.core as mx
    from mlx.utils import tree_map
    return tree_map(lambda n, o: mx.where(healthy, n, o), new, old)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)
