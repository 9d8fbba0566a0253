"""What a run writes as it trains: checkpoints (adapter, optimizer state, trainer state) and the final
adapter, with a failed write said in words."""

from __future__ import annotations

import math
from pathlib import Path

from engine import atomic
from engine import protocol as ev
from engine.train.errors import TrainingError


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


class Saving:
    """TrainingRun's writes (TrainingRun inherits them)."""

    def _checkpoint(self, reason: str, val: float | None, is_best: bool, elapsed: float) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from engine.model.adapters import save_adapters

        def write(folder: Path) -> None:
            save_adapters(self.model, self.adapter_config, folder)
            flat = dict(tree_flatten(self.optimizer.state))
            mx.save_safetensors(str(folder / "optimizer.safetensors"), flat)

        if not self.world.is_main:  # rank 0 writes for the group; the path is the same on every rank
            self.last_checkpoint = str(self.store.folder / f"step_{self.step:06d}")
            return
        state = {"step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "pos": self.pos,
                 "order": [list(map(int, b)) for b in self.order], "val_loss": val,
                 "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                 "tokens_seen": self.tokens_seen, "elapsed": self.elapsed_before + elapsed,
                 "seed": self.cfg.training.seed, "rng": "mx.random.seed(step_seed(seed, step)) each step",
                 "reason": reason, "run": self.identity, "config": self.cfg.to_dict(), "resumes": self.resumes}
        try:
            path = self.store.save(self.step, write, state, is_best)
        except (OSError, RuntimeError) as exc:
            raise TrainingError(f"could not save the checkpoint at step {self.step} to {self.store.folder}: "
                                f"{write_problem(exc, self.store.folder)}; the previous checkpoint is intact",
                                "disk") from None
        self.last_checkpoint = str(path)
        self.emit(ev.CheckpointSaved(self.step, str(path), reason, is_best,
                                     tuple(str(c.path) for c in self.store.list())))

    def _write_final_adapter(self) -> Path:
        """run_dir/adapter: the adapter of the last step, in mlx-lm's format (atomic swap)."""
        from engine.model.adapters import save_adapters
        final = self.run_dir / "adapter"
        try:
            with atomic.folder(final) as tmp:
                save_adapters(self.model, self.adapter_config, tmp)
        except (OSError, RuntimeError) as exc:
            raise TrainingError(f"could not write the adapter to {final}: {write_problem(exc, self.run_dir)}; "
                                f"the last checkpoint ({self.last_checkpoint}) is intact", "disk") from None
        return final
