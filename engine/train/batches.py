"""Length-bucketed batches with a seeded, resumable order.

mlx-lm's length sorting is a no-op for JSONL data (it sorts by the number of keys in a record), so short
and long conversations share batches and padding burns compute. Here each epoch's seeded permutation is
cut into windows, each window sorted by token length and cut into batches, and the batches shuffled:
little padding, still random. The order is a pure function of (seed, epoch), and is also saved in
checkpoints, so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np

from engine.data import Example

WINDOW_BATCHES = 32  # batches per sorting window
PAD_MULTIPLE = 16  # pad lengths up to a multiple of this: fewer distinct shapes for the compiled step


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    window = batch_size * WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, n, window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def collate(examples: list[Example], pad_id: int, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(inputs, targets, loss mask, real tokens): targets are inputs shifted by one; the mask marks trained
    target positions. Lengths are padded up to PAD_MULTIPLE (capped at max_len)."""
    longest = max(len(e.encoded) for e in examples)
    width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max_len)
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    trained = np.zeros((len(examples), width), dtype=bool)
    real = 0
    for row, ex in enumerate(examples):
        n = min(len(ex.encoded), width)
        tokens[row, :n] = ex.encoded.tokens[:n]
        trained[row, :n] = ex.encoded.trained[:n]
        real += n
    return tokens[:, :-1], tokens[:, 1:], trained[:, 1:], real


def steps_per_epoch(n_examples: int, batch_size: int, grad_accumulation: int) -> int:
    micro = -(-n_examples // batch_size)
    return -(-micro // grad_accumulation)
