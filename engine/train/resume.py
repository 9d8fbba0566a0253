"""Resuming a run from a checkpoint (found by trainer_state.find_resume): refuse one from another run,
restore the adapter and optimizer state, and continue its TrainerState with the settings that changed
said and recorded."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from engine.config.schema import Config
from engine.train import run_folder
from engine.train.errors import TrainingError
from engine.train.flat_update import leaf_slot
from engine.train.trainer_state import TrainerState


def check_same_run(folder: Path, saved: TrainerState, identity: dict, warn: Callable[[str], None]) -> None:
    """Refuse a resume that cannot continue the checkpoint's run exactly (other data, seed, batch, LoRA)."""
    if saved.run is None:
        if identity.get("data_sha256"):  # warn once, when the data are known
            warn(f"{folder.name} was saved by an older lora-tui that did not record its dataset, seed, batch and "
                 "LoRA settings: they cannot be checked against this run's; it also used AdamW without bias "
                 "correction, and the resumed steps use training.adam_bias_correction")
        return
    conflicts = run_folder.resume_conflicts(saved.run, identity)
    if conflicts:
        raise TrainingError(f"cannot resume {folder} exactly: {'; '.join(conflicts)}. Set them back to resume "
                            "it, or start a new run (--overwrite replaces it, or another --run-name)", "config")


def load_checkpoint_weights(folder: Path, model, optimizer) -> None:
    """The checkpoint's adapter into `model` and its optimizer state into `optimizer`."""
    import mlx.core as mx

    from engine.model.adapters import AdapterError, load_adapter_weights
    try:
        load_adapter_weights(model, folder)
        opt = mx.load(str(folder / "optimizer.safetensors"))
    except AdapterError as exc:
        raise TrainingError(f"cannot resume: {exc}", "checkpoint") from None
    except Exception as exc:
        raise TrainingError(f"cannot resume: {folder / 'optimizer.safetensors'} unreadable ({exc})",
                            "checkpoint") from None
    for key, value in opt.items():
        try:
            _set_leaf(optimizer.state, key, value)
        except (KeyError, IndexError, ValueError):
            raise TrainingError(f"cannot resume: optimizer state {key!r} does not fit this config",
                                "checkpoint") from None


def continued_state(folder: Path, saved: TrainerState, cfg: Config, identity: dict, total_steps: int,
                    train_rows: int, warn: Callable[[str], None]) -> tuple[TrainerState, str | None]:
    """The state this process continues from, and where the run's previous config.yaml is kept when
    settings that may change on a resume (learning rate, length, intervals...) did; each change is said."""
    rows = max((i for batch in saved.order for i in batch), default=-1)
    if rows >= train_rows:  # only an old checkpoint without a data fingerprint gets here
        raise TrainingError(f"cannot resume {folder}: its data order uses training row {rows}, this dataset "
                            f"has {train_rows}: resume with the run's dataset", "config")
    changes = run_folder.config_changes(saved.config, cfg.to_dict()) if saved.config is not None else {}
    resumes = saved.resumes + [{"step": saved.step, "checkpoint": str(folder),
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": changes}]
    kept_as = None
    if changes:
        kept_as = f"config.step_{saved.step:06d}.yaml"
        said = ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())
        warn(f"resuming step {saved.step} with changed settings: {said}; the run's config.yaml is updated, the "
             f"previous one kept as {kept_as}")
    if saved.total_steps != total_steps:
        warn(f"the checkpoint was made for {saved.total_steps} steps, this run has {total_steps}: the schedule "
             "follows the new total")
    state = dataclasses.replace(saved, total_steps=total_steps, seed=cfg.training.seed, run=identity,
                                config=cfg.to_dict(), resumes=resumes, last_checkpoint=str(folder))
    return state, kept_as


def _set_leaf(tree, path: str, value) -> None:
    container, index = leaf_slot(tree, path)
    container[index] = value


def _shown(value) -> str:
    return "unset" if value is None else repr(value)
