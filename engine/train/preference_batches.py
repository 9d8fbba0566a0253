"""Host-side rows of a preference run: which sequences a micro-batch holds, KTO's mismatched
prompt/answer pairs for its KL reference point, and which rows the run will reach (for the reference pass).

Per row of a split there are two sequences, each scored by its sum of log p over trained tokens:
  KTO:      0 = the row's own answer, 1 = its prompt with another row's answer (the KL pair)
  DPO/ORPO: 0 = prompt + chosen, 1 = prompt + rejected
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.data import Encoded, Example
from engine.train.batches import collate, epoch_batches
from engine.train.losses import trained_positions


def first_trained(enc: Encoded) -> int:
    hits = np.flatnonzero(enc.trained)
    return int(hits[0]) if len(hits) else len(enc)


def mismatched(prompt_of: Encoded, answer_of: Encoded, max_len: int) -> Encoded:
    """One row's prompt followed by another row's answer: a sample of y ~ D for x, which z0 needs."""
    p, a = first_trained(prompt_of), first_trained(answer_of)
    tokens = np.concatenate([prompt_of.tokens[:p], answer_of.tokens[a:]])[:max_len]
    trained = np.concatenate([np.zeros(p, bool), answer_of.trained[a:]])[:max_len]
    return Encoded(tokens, trained)


def kl_partners(n: int, seed: int) -> np.ndarray:
    """partner[i]: the row whose answer row i's KL pair borrows; a seeded cycle, so never i itself (n > 1)
    and fixed for the run (its reference log-probs are computed once). TRL shifts answers within a batch."""
    order = np.random.default_rng([seed, 17]).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


@dataclass
class PreferenceRows:
    """The two sequences of every row of one split, for a method."""
    method: str
    examples: list[Example]
    max_len: int
    seed: int

    def __post_init__(self):
        self.partner = kl_partners(len(self.examples), self.seed) if self.method == "kto" else None
        self._kl: dict[int, Encoded] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def sequence(self, row: int, which: int) -> Encoded:
        ex = self.examples[row]
        if which == 0:
            return ex.encoded
        if self.method != "kto":
            return ex.rejected
        if row not in self._kl:
            self._kl[row] = mismatched(ex.encoded, self.examples[self.partner[row]].encoded, self.max_len)
        return self._kl[row]

    def desirable(self, rows: list[int]) -> np.ndarray:
        return np.array([self.examples[r].label == "desirable" for r in rows], dtype=np.float32)

    def length(self, row: int) -> int:
        """The row's longest sequence of a micro-batch's gradient pass (both answers for a pair)."""
        ex = self.examples[row]
        return max(len(ex.encoded), len(ex.rejected)) if ex.rejected is not None and self.method != "kto" \
            else len(ex.encoded)


def sequence_arrays(seqs: list[Encoded], pad_id: int, max_len: int):
    """(inputs, targets, positions, weights, row of each position, real tokens) for a list of sequences:
    the trained target positions padded to a multiple of 64, as engine.train.losses.loss_inputs pads them."""
    inputs, targets, mask, real = collate([Example(0, None, s) for s in seqs], pad_id, max_len)
    positions, weights = trained_positions(mask)
    rows = (positions // inputs.shape[1]).astype(np.int32)
    return inputs, targets, positions, weights, rows, real


def rows_ahead(lengths: list[int], global_batch: int, seed: int, shuffle: bool, epoch: int, pos: int,
               order: list[list[int]], micro_batches: int) -> list[int]:
    """Every training row the next `micro_batches` micro-batches will use (all ranks' shares), in the
    deterministic order engine.train.batches gives: the rows whose reference log-probs the run needs."""
    seen: set[int] = set()
    n = len(lengths)
    while micro_batches > 0 and len(seen) < n:
        if pos >= len(order):
            epoch, pos = epoch + 1, 0
            order = epoch_batches(lengths, global_batch, seed, epoch, shuffle)
        take = order[pos:pos + micro_batches]
        for batch in take:
            seen.update(batch)
        micro_batches -= len(take)
        pos += len(take)
    return sorted(seen)
