"""Seeded train/validation split, stratified by label so both sides keep the same mix."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def stratified_split(items: Sequence[T], labels: Sequence[str | None], val_fraction: float, seed: int,
                     stratify: bool = True) -> tuple[list[T], list[T]]:
    """Return (train, validation). Each label group gives round(n * val_fraction) rows to validation
    (at least one from a group of two or more when val_fraction > 0), chosen by a seeded shuffle."""
    if val_fraction <= 0 or len(items) < 2:
        return list(items), []
    rng = np.random.default_rng(seed)
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label if stratify else None].append(i)
    val_idx: list[int] = []
    for key in sorted(groups, key=lambda k: (k is None, str(k))):
        idx = np.array(groups[key])
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if n_val == 0 and len(idx) >= 2:
            n_val = 1
        n_val = min(n_val, len(idx) - 1) if len(idx) > 1 else 0
        val_idx.extend(idx[:n_val].tolist())
    chosen = set(val_idx)
    train = [items[i] for i in range(len(items)) if i not in chosen]
    val = [items[i] for i in sorted(chosen)]
    return train, val
