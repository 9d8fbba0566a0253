"""The step of a KTO, DPO or ORPO run: the compiled micro step (sequence log-probs -> preference loss ->
gradients), KTO's KL reference point measured before it, accumulation over micro-batches and ranks, and
the same loss on the validation split. SFT keeps its own path (engine/train/step.py).

Each micro step's loss is already divided by the whole step's row count (and, for ORPO's NLL, its chosen
token count), both known on the host before the first micro-batch runs: the summed gradients are those of
one big batch, whatever the accumulation or the number of ranks.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np

from engine.protocol import PreferenceStats
from engine.train.losses import sequence_logps
from engine.train.preference import dpo_loss, kto_loss, orpo_loss
from engine.train.preference_batches import PreferenceRows, sequence_arrays

# Sums a micro step returns: chosen/desirable rewards and count, rejected/undesirable rewards and count,
# rows on the right side (margin > 0; KTO: log ratio above z0 if desirable, below if not), rows, ORPO's NLL.
STATS = 7


def preference_stats(method: str, loss: float, sums: np.ndarray, kl: float | None) -> tuple[float, PreferenceStats]:
    mean = lambda total, n: float(total / n) if n > 0 else None  # noqa: E731
    chosen, rejected = mean(sums[0], sums[1]), mean(sums[2], sums[3])
    margin = None if chosen is None or rejected is None else chosen - rejected
    return loss, PreferenceStats(method, chosen, rejected, margin, float(sums[4] / max(sums[5], 1)),
                                 kl if method == "kto" else None, float(sums[6]) if method == "orpo" else None)


class PreferenceObjective:
    def __init__(self, cfg, model, pad_id: int, train: PreferenceRows, valid: PreferenceRows):
        t = cfg.training
        self.method, self.model, self.pad_id, self.max_len = t.method, model, pad_id, cfg.model.max_seq_length
        self.beta, self.weights = t.beta, (t.desirable_weight, t.undesirable_weight or auto_weight(t, train))
        self.splits = {"train": train, "valid": valid}
        self.reference = {"train": np.full((len(train), 2), np.nan, np.float32),
                          "valid": np.full((len(valid), 2), np.nan, np.float32)}
        self._micro_step = None
        self.last_train: PreferenceStats | None = None
        self.last_valid: PreferenceStats | None = None

    # ------------------------------------------------------------ one micro-batch

    def micro_loss(self, model, inputs, targets, positions, weights, rows, ref, desirable, kl, scale,
                   nll_scale, gradient_in_forward: bool = False):
        """(this micro-batch's share of the step's loss, its STATS sums) for `rows` sequences.
        `gradient_in_forward`: the training step's (the head in chunks, losses.CE_CHUNK_BYTES)."""
        logps, counts = sequence_logps(model, inputs, targets, positions, weights, rows, gradient_in_forward)
        if self.method == "kto":
            losses, rewards = kto_loss(logps, ref, desirable, kl, self.beta, *self.weights)
            right = mx.where(desirable > 0, logps - ref > kl, logps - ref < kl)
            stats = [(rewards * desirable).sum(), desirable.sum(), (rewards * (1 - desirable)).sum(),
                     (1 - desirable).sum(), right.sum(), desirable.size, 0.0]
            return losses.sum() * scale, _stack(stats)
        n = logps.shape[0] // 2  # chosen rows first, then their rejected answers
        nll = mx.array(0.0)
        if self.method == "dpo":
            losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta)
        else:
            mean = logps / mx.maximum(counts, 1)
            losses, chosen, rejected, _ = orpo_loss(mean[:n], mean[n:], self.beta)
            nll = -logps[:n].sum() * nll_scale
        stats = [chosen.sum(), n, rejected.sum(), n, (chosen > rejected).sum(), n, nll]
        return nll + losses.sum() * scale, _stack(stats)

    def build(self, optimizer) -> None:
        import mlx.nn as nn

        from engine.model.cpu_attention import training_attention
        loss_and_grad = nn.value_and_grad(self.model, partial(self.micro_loss, gradient_in_forward=True))
        state = [self.model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def micro_step(*arrays):
            with training_attention():  # as the SFT step (engine/train/step.py)
                (loss, stats), grads = loss_and_grad(self.model, *arrays)
            return loss, stats, grads
        self._micro_step = micro_step

    def arrays(self, split: str, rows: list[int]):
        """The sequences of `rows` (KTO: their answers; pairs: chosen then rejected) and their reference."""
        data, ref = self.splits[split], self.reference[split]
        idx = np.asarray(rows, dtype=np.int64)
        if self.method == "kto":
            seqs, refs = [data.sequence(r, 0) for r in rows], ref[idx, 0]
        else:
            seqs = [data.sequence(r, 0) for r in rows] + [data.sequence(r, 1) for r in rows]
            refs = np.concatenate([ref[idx, 0], ref[idx, 1]])
        if self.method != "orpo" and np.isnan(refs).any():  # prepare scores every row the run reaches
            raise RuntimeError(f"no reference log-prob for {split} rows {[r for r in rows if np.isnan(ref[r]).any()]}")
        return sequence_arrays(seqs, self.pad_id, self.max_len), np.nan_to_num(refs), data.desirable(rows)

    # ------------------------------------------------------------ one optimizer step

    def kl_point(self, split: str, batches: list[list[int]], world=None) -> float:
        """KTO's z0 for a step: the policy's mean log ratio over the step's mismatched pairs (every
        micro-batch, every rank), clamped at 0. Measured before the gradient pass, so no gradient flows."""
        data, ref = self.splits[split], self.reference[split]
        total, count = 0.0, 0
        for rows in batches:
            if not rows:
                continue
            inputs, targets, positions, weights, seq_rows, _ = sequence_arrays(
                [data.sequence(r, 1) for r in rows], self.pad_id, self.max_len)
            logps, _ = sequence_logps(self.model, *map(mx.array, (inputs, targets, positions, weights, seq_rows)))
            total += float((np.array(logps) - ref[np.asarray(rows), 1]).sum())
            count += len(rows)
        if world is not None and not world.alone:
            total, count = world.sum_number(total), world.sum_number(count)
        return max(total / max(count, 1), 0.0)

    def step(self, batches: list[list[int]], world=None):
        """(summed gradients, loss, (stats sums, z0), real tokens) of one optimizer step over this rank's
        micro-batches `batches` (rows of the training split; a rank's share may be empty)."""
        from mlx.utils import tree_map
        kl = self.kl_point("train", batches, world) if self.method == "kto" else 0.0
        prepared = [self.arrays("train", rows) for rows in batches if rows]
        n_rows = sum(len(rows) for rows in batches)
        chosen_tokens = sum(_chosen_tokens(a[0], len(rows)) for a, rows in zip(prepared, [r for r in batches if r]))
        if world is not None and not world.alone:
            n_rows, chosen_tokens = world.sum_number(n_rows), world.sum_number(chosen_tokens)
        scale, nll_scale = 1.0 / max(n_rows, 1), 1.0 / max(chosen_tokens, 1)
        grads, loss, sums, real = None, mx.array(0.0), mx.zeros(STATS), 0
        for (inputs, targets, positions, weights, seq_rows, n_real), refs, desirable in prepared:
            arrays = [mx.array(a) for a in (inputs, targets, positions, weights, seq_rows, refs, desirable)]
            l, s, g = self._micro_step(*arrays, mx.array(kl, mx.float32), mx.array(scale, mx.float32),
                                       mx.array(nll_scale, mx.float32))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss, sums, real = loss + l, sums + s, real + n_real
            mx.eval(grads, loss, sums)  # bound memory: one micro-batch graph at a time
        if grads is None:  # this rank's share of the step is empty: it adds zeros
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        if world is not None and not world.alone:
            grads, loss, sums = world.sum((grads, loss, sums))
        return grads, loss, (sums, kl), real

    # ------------------------------------------------------------ validation

    def validate(self, batches: list[list[int]], world=None) -> tuple[float, PreferenceStats]:
        """The loss and rewards on validation `batches` (rows of the validation split; each rank scores its
        share of each), without dropout; KTO's z0 is measured over all of them."""
        ranks, rank = (world.size, world.rank) if world is not None else (1, 0)
        mine = [b[rank::ranks] for b in batches]
        was_training = self.model.training
        self.model.eval()
        try:
            kl = self.kl_point("valid", mine, world) if self.method == "kto" else 0.0
            prepared = [(self.arrays("valid", rows), len(rows)) for rows in mine if rows]
            n_rows = sum(len(b) for b in batches)
            chosen = world.sum_number(sum(_chosen_tokens(a[0], n) for a, n in prepared)) if ranks > 1 else \
                sum(_chosen_tokens(a[0], n) for a, n in prepared)
            loss, sums = mx.array(0.0), mx.zeros(STATS)
            for ((inputs, targets, positions, weights, seq_rows, _), refs, desirable), _ in prepared:
                arrays = [mx.array(a) for a in (inputs, targets, positions, weights, seq_rows, refs, desirable)]
                l, s = self.micro_loss(self.model, *arrays, mx.array(kl, mx.float32),
                                       mx.array(1.0 / max(n_rows, 1), mx.float32),
                                       mx.array(1.0 / max(chosen, 1), mx.float32))
                loss, sums = loss + l, sums + s
                mx.eval(loss, sums)
        finally:
            self.model.train(was_training)
        if ranks > 1:
            loss, sums = world.sum((loss, sums))
        loss, self.last_valid = preference_stats(self.method, loss.item(), np.array(sums), kl)
        return loss, self.last_valid

    def stats(self, loss: float, sums_kl) -> tuple[float, PreferenceStats]:
        sums, kl = sums_kl
        loss, self.last_train = preference_stats(self.method, loss, np.array(sums), kl)
        return loss, self.last_train

    def summary(self) -> dict:
        """The report's view: settings, where the reference came from, the last step's and validation's stats."""
        import dataclasses
        return {"method": self.method, "beta": self.beta, "weights": list(self.weights) if self.method == "kto" else None,
                "reference": None if self.method == "orpo" else "log-probs scored before step 1",
                "last_step": dataclasses.asdict(self.last_train) if self.last_train else None,
                "last_validation": dataclasses.asdict(self.last_valid) if self.last_valid else None}


def auto_weight(t, train: PreferenceRows) -> float:
    """KTO's undesirable_weight when left at 0: the one that makes lambda_D n_D = lambda_U n_U, the low end of
    the paper's advice (lambda_D n_D / lambda_U n_U in [1, 4/3]) whatever the label mix."""
    desirable = sum(e.label == "desirable" for e in train.examples)
    undesirable = len(train.examples) - desirable
    return t.desirable_weight * desirable / undesirable if undesirable and desirable else 1.0


def _stack(values) -> mx.array:
    return mx.stack([v.astype(mx.float32) if isinstance(v, mx.array) else mx.array(v, mx.float32)
                     for v in values])


def _chosen_tokens(arrays, n: int) -> int:
    """Trained target tokens of a pair micro-batch's chosen rows (the first n sequences): ORPO's NLL divisor."""
    _, _, _, weights, seq_rows, _ = arrays
    return int(weights[seq_rows < n].sum())
