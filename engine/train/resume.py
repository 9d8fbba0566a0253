"""Resuming a run: find the newest usable checkpoint, refuse one from another run, restore the adapter,
optimizer and data position, and record the settings that changed."""

from __future__ import annotations

import math
import time
from pathlib import Path

from engine.train import run_folder
from engine.train.checkpoints import STATE_FILE, CheckpointError, checkpoint_problem, read_state
from engine.train.errors import TrainingError


class Resuming:
    """TrainingRun's resume steps (TrainingRun inherits them; the state they set lives on the run)."""

    def _find_resume(self) -> tuple[dict | None, Path | None]:
        if not self.resume_from:
            return None, None
        path = Path(self.resume_from).expanduser()
        if self.resume_from != "latest" and (path / STATE_FILE).is_file():
            candidates = [path]
        else:
            candidates = [c.path for c in self.store.newest_first()]
        reasons = []
        for folder in candidates:  # newest first; an unusable one falls back to the one before
            try:
                state = read_state(folder)
                problem = checkpoint_problem(folder)
                if problem:
                    raise CheckpointError(problem)
                return state, folder
            except CheckpointError as exc:
                reasons.append(str(exc))
                if len(candidates) > 1:
                    self.warn(f"skipping unusable checkpoint {folder.name}: {exc}")
        more = f" (and {len(reasons) - 1} older checkpoint(s) unusable too)" if len(reasons) > 1 else ""
        raise TrainingError(f"cannot resume: {reasons[0]}{more}", "checkpoint")

    def _check_same_run(self, folder: Path, state: dict, identity: dict) -> None:
        """Refuse a resume that cannot continue the checkpoint's run exactly (other data, seed, batch, LoRA)."""
        old = state.get("run")
        if old is None:
            if identity.get("data_sha256"):  # warn once, when the data are known
                self.warn(f"{folder.name} was saved by an older lora-tui that did not record its dataset, seed, "
                          "batch and LoRA settings: they cannot be checked against this run's; it also used AdamW "
                          "without bias correction, and the resumed steps use training.adam_bias_correction")
            return
        conflicts = run_folder.resume_conflicts(old, identity)
        if conflicts:
            raise TrainingError(f"cannot resume {folder} exactly: {'; '.join(conflicts)}. Set them back to resume "
                                "it, or start a new run (--overwrite replaces it, or another --run-name)", "config")

    def _record_changes(self, folder: Path, state: dict) -> None:
        """Settings that may change on a resume (learning rate, length, intervals...): said and recorded."""
        changes = run_folder.config_changes(state["config"], self.cfg.to_dict()) if "config" in state else {}
        self.resumes = state.get("resumes", []) + [
            {"step": state["step"], "checkpoint": str(folder), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changed": changes}]
        if changes:
            self.config_kept_as = f"config.step_{state['step']:06d}.yaml"
            said = ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())
            self.warn(f"resuming step {state['step']} with changed settings: {said}; the run's config.yaml is "
                      f"updated, the previous one kept as {self.config_kept_as}")

    def _restore(self, folder: Path, state: dict) -> None:
        import mlx.core as mx

        from engine.model.adapters import AdapterError, load_adapter_weights
        try:
            load_adapter_weights(self.model, folder)
            opt = mx.load(str(folder / "optimizer.safetensors"))
        except AdapterError as exc:
            raise TrainingError(f"cannot resume: {exc}", "checkpoint") from None
        except Exception as exc:
            raise TrainingError(f"cannot resume: {folder / 'optimizer.safetensors'} unreadable ({exc})",
                                "checkpoint") from None
        for key, value in opt.items():
            try:
                _set_leaf(self.optimizer.state, key, value)
            except (KeyError, IndexError, ValueError):
                raise TrainingError(f"cannot resume: optimizer state {key!r} does not fit this config",
                                    "checkpoint") from None
        rows = max((i for batch in state["order"] for i in batch), default=-1)
        if rows >= len(self.data.train):  # only an old checkpoint without a data fingerprint gets here
            raise TrainingError(f"cannot resume {folder}: its data order uses training row {rows}, this dataset "
                                f"has {len(self.data.train)}: resume with the run's dataset", "config")
        self._record_changes(folder, state)
        self.step = state["step"]
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.order = state["order"]
        self.best_val = state.get("best_val_loss") or math.inf
        self.tokens_seen = state.get("tokens_seen", 0)
        self.elapsed_before = state.get("elapsed", 0.0)
        self.last_checkpoint = str(folder)
        if state.get("total_steps") != self.total_steps:
            self.warn(f"the checkpoint was made for {state.get('total_steps')} steps, this run has "
                      f"{self.total_steps}: the schedule follows the new total")


def _set_leaf(tree, path: str, value) -> None:
    parts = path.split(".")
    node = tree
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _shown(value) -> str:
    return "unset" if value is None else repr(value)
