"""The reference policy of KTO and DPO, as log-probs computed once before the first step.

Why once, not a reference forward every step: the policy at step 0 *is* the reference (fresh adapters add
exactly zero; an init_adapter is where the run starts), so scoring each row the run will reach before the
first update needs no second copy of any weights and no reference forward inside the step: KTO's step is
SFT's plus one forward for z0's mismatched pairs, DPO's is SFT's on twice the rows (bench/RESULTS.md). It
costs one forward over the rows the run reaches, the same as scoring them step by step in the first epoch
and less in every later one. The numbers (two floats a row) are saved in every checkpoint, so a resume
uses exactly the ones the run started with; rows a longer resumed run reaches that were never scored are
scored with the reference restored: the base with the adapters switched off, or the init adapter's weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from engine.train.errors import StoppedEarly, TrainingError

REFERENCE_FILE = "reference_logps.safetensors"


@contextmanager
def reference_policy(model, init_adapter: str):
    """`model` as the policy the run started from: the base (adapters off) or the init adapter's weights."""
    from engine.model.adapters import AdapterError, adapter_folder, adapter_weights, adapters_disabled, \
        read_adapter_weights
    if not init_adapter:
        with adapters_disabled(model):
            yield model
        return
    try:
        weights = read_adapter_weights(adapter_folder(init_adapter) / "adapters.safetensors")
    except AdapterError as exc:
        raise TrainingError(f"training.init_adapter (the reference policy): {exc}", "config") from None
    current = adapter_weights(model)
    model.load_weights(list(weights.items()), strict=False)
    try:
        yield model
    finally:
        model.load_weights(list(current.items()), strict=False)


def score_rows(objective, split: str, rows: list[int], init_adapter: str, batch: int,
               progress: Callable[[float], None] | None = None, should_stop: Callable[[], bool] | None = None) -> int:
    """Fill the reference log-probs of `rows` (both sequences of each) not yet scored; returns how many
    sequences were scored. Length-sorted batches of `batch` sequences, without dropout."""
    import mlx.core as mx

    from engine.train.losses import sequence_logps
    from engine.train.preference_batches import sequence_arrays
    data, ref = objective.splits[split], objective.reference[split]
    todo = [(r, w) for r in rows for w in (0, 1) if np.isnan(ref[r, w])]
    if not todo:
        return 0
    todo.sort(key=lambda rw: len(data.sequence(*rw)))
    model = objective.model
    was_training = model.training
    model.eval()
    try:
        with reference_policy(model, init_adapter):
            for start in range(0, len(todo), batch):
                part = todo[start:start + batch]
                arrays = sequence_arrays([data.sequence(r, w) for r, w in part], objective.pad_id, objective.max_len)
                logps, _ = sequence_logps(model, *map(mx.array, arrays[:5]))
                for (r, w), value in zip(part, np.array(logps)):
                    ref[r, w] = value
                if progress:
                    progress(min(start + batch, len(todo)) / len(todo))
                if should_stop and should_stop():
                    raise StoppedEarly()
    finally:
        model.train(was_training)
    return len(todo)


def save_reference(objective, folder: Path) -> None:
    import mlx.core as mx
    mx.save_safetensors(str(folder / REFERENCE_FILE), {k: mx.array(v) for k, v in objective.reference.items()})


def load_reference(objective, folder: Path) -> bool:
    """The reference log-probs a checkpoint saved (True), or nothing when it holds none of this shape."""
    import mlx.core as mx
    path = folder / REFERENCE_FILE
    if not path.is_file():
        return False
    try:
        saved = mx.load(str(path))
    except Exception as exc:  # noqa: BLE001  (MLX raises RuntimeError or ValueError for a bad file)
        raise TrainingError(f"cannot resume: {path} unreadable ({exc})", "checkpoint") from None
    if any(k not in saved or tuple(saved[k].shape) != v.shape for k, v in objective.reference.items()):
        return False
    for k, v in objective.reference.items():
        v[...] = np.array(saved[k])
    return True
