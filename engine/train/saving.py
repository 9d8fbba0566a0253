"""What a run writes as it trains: its config.yaml, checkpoints (adapter, optimizer state, trainer state)
and the final adapter, with a failed write said in words."""

from __future__ import annotations

from pathlib import Path

from engine import atomic
from engine.config.loading import to_yaml
from engine.config.schema import Config
from engine.train.checkpoints import CheckpointStore
from engine.train.errors import TrainingError
from engine.train.trainer_state import TrainerState


def write_problem(exc: BaseException, folder: Path) -> str:
    """Why a save failed, in words: MLX's safetensors writer raises RuntimeError("[write] Unable to write
    ...") where Python would raise OSError(ENOSPC), so ask the file system how much room is left."""
    import shutil
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return f"No space left on device ({free:,} bytes free)"
    if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
        raise exc  # not a write failure: let the caller report it as the bug it is
    return str(exc)


def save_checkpoint(store: CheckpointStore, model, adapter_config: dict, optimizer, state: TrainerState,
                    reason: str, val: float | None, is_best: bool, session_seconds: float,
                    objective=None) -> Path:
    """A checkpoint of the step `state` is at: the adapter, the optimizer state and trainer_state.json (and a
    KTO/DPO run's reference log-probs, so that a resume scores against exactly the same numbers)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from engine.model.adapters import save_adapters

    def write(folder: Path) -> None:
        save_adapters(model, adapter_config, folder)
        flat = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(folder / "optimizer.safetensors"), flat)
        if objective is not None and objective.method != "orpo":
            from engine.train.reference import save_reference
            save_reference(objective, folder)

    try:
        return store.save(state.step, write, state.to_json(reason, val, session_seconds), is_best)
    except (OSError, RuntimeError) as exc:
        raise TrainingError(f"could not save the checkpoint at step {state.step} to {store.folder}: "
                            f"{write_problem(exc, store.folder)}; the previous checkpoint is intact",
                            "disk") from None


def write_final_adapter(run_dir: Path, model, adapter_config: dict, last_checkpoint: str | None) -> Path:
    """run_dir/adapter: the adapter of the last step, in mlx-lm's format (atomic swap)."""
    from engine.model.adapters import save_adapters
    final = run_dir / "adapter"
    try:
        with atomic.folder(final) as tmp:
            save_adapters(model, adapter_config, tmp)
    except (OSError, RuntimeError) as exc:
        raise TrainingError(f"could not write the adapter to {final}: {write_problem(exc, run_dir)}; "
                            f"the last checkpoint ({last_checkpoint}) is intact", "disk") from None
    return final


def write_run_config(run_dir: Path, cfg: Config, kept_as: str | None) -> None:
    """run_dir/config.yaml, the settings as used; a resume with changed settings keeps the old one as `kept_as`."""
    current = run_dir / "config.yaml"
    if kept_as and current.is_file():
        atomic.write_text(run_dir / kept_as, current.read_text())
    atomic.write_text(current, to_yaml(cfg))
