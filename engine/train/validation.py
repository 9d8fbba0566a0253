"""Validation loss and perplexity: the training loss on the validation split."""

from __future__ import annotations

import math

import mlx.core as mx

from engine.data import Example
from engine.train.batches import collate
from engine.train.losses import loss_inputs, masked_loss


def validation_loss(model, examples: list[Example], batch_size: int, pad_id: int, max_len: int,
                    max_batches: int = -1, world=None) -> float:
    """Token-weighted mean loss over the validation split (length-sorted batches, no dropout). In a
    distributed run (`world`, engine.train.distributed.World) batches are global, batch_size rows per rank,
    and each rank scores its share of each: the same examples and value as one process with the global
    batch, in 1/N of the time."""
    if not examples:
        return float("nan")
    ranks, rank = (world.size, world.rank) if world is not None else (1, 0)
    picked = validation_batches([len(e.encoded) for e in examples], batch_size * ranks, max_batches)
    batches = [[examples[i] for i in batch] for batch in picked]
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    try:
        for batch in batches:
            mine = batch[rank::ranks]
            if mine:
                s, n = masked_loss(model, *loss_inputs(*collate(mine, pad_id, max_len)[:3]))
                total, count = total + s, count + n
                mx.eval(total, count)
    finally:
        model.train(was_training)
    if ranks > 1:
        total, count = world.sum((total, count))
    return (total / mx.maximum(count, 1)).item()


def validation_batches(lengths: list[int], rows: int, max_batches: int = -1) -> list[list[int]]:
    """The validation batches, as row numbers: length-sorted, `rows` each, at most `max_batches` of them
    spread over all lengths (not just the shortest)."""
    ordered = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [ordered[i:i + rows] for i in range(0, len(ordered), rows)]
    if max_batches > 0 and len(batches) > max_batches:
        step = len(batches) / max_batches
        batches = [batches[int(i * step)] for i in range(max_batches)]
    return batches


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
