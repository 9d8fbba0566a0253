"""The checkpoints a run keeps on disk: step, why it was saved, its validation loss, the best marked."""

from __future__ import annotations

from textual.widgets import DataTable

from engine.protocol import CheckpointSaved, Eval


def checkpoint_step(path: str) -> int | None:
    """The step in a checkpoint folder's name (step_000042), None for any other name."""
    tail = path.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


class CheckpointTable(DataTable):
    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self.val_losses: dict[int, float] = {}
        self.best_step: int | None = None
        self.add_columns("step", "reason", "val loss", "")

    def clear_run(self) -> None:
        self.val_losses, self.best_step = {}, None
        self.clear()

    def add_eval(self, evaluation: Eval) -> None:
        self.val_losses[evaluation.step] = evaluation.val_loss
        if evaluation.is_best:
            self.best_step = evaluation.step

    def show_saved(self, saved: CheckpointSaved) -> None:
        """Every checkpoint still on disk after this save (older ones may have been pruned)."""
        self.clear()
        for path in saved.kept:
            step = checkpoint_step(path)
            val = self.val_losses.get(step)
            self.add_row(str(step), saved.reason if step == saved.step else "",
                         f"{val:.4f}" if val is not None else "", "★ best" if step == self.best_step else "")
