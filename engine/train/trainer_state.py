"""A run's progress, `TrainerState`: the loop updates it each step, every checkpoint saves it as
`trainer_state.json`, and a resume reads it back (checked field by field) to continue exactly where the
checkpoint's run was. `find_resume` picks the checkpoint a resume continues from."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.train.checkpoints import STATE_FILE, CheckpointError, CheckpointStore, checkpoint_problem
from engine.train.errors import TrainingError

RNG_NOTE = "mx.random.seed(step_seed(seed, step)) each step"  # how the dropout RNG follows the step


@dataclass
class TrainerState:
    """Where a run is in its data and what it has done: what trainer_state.json holds (each checkpoint adds
    its own reason and validation loss), and below it what only this process keeps."""
    step: int = 0  # optimizer steps done
    total_steps: int | None = None  # the run's length (None in a checkpoint that did not record it)
    epoch: int = 0
    pos: int = 0  # batches of `order` done in this epoch
    order: list[list[int]] = field(default_factory=list)  # this epoch's batches, as rows of the training split
    best_val: float = math.inf  # the best validation loss so far
    tokens_seen: int = 0  # trained tokens over the whole run
    elapsed_before: float = 0.0  # seconds the run trained before this process took it up
    seed: int = 0
    run: dict | None = None  # run_identity(): what a resume must match (None: saved by an older lora-tui)
    config: dict | None = None  # the settings the checkpoint was made with
    resumes: list[dict] = field(default_factory=list)  # each resume: step, checkpoint, settings changed
    # This process only, never saved:
    last_val: float | None = None
    last_checkpoint: str | None = None
    session_tokens: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step

    def to_json(self, reason: str, val_loss: float | None, session_seconds: float) -> dict:
        """trainer_state.json of a checkpoint made now, for `reason`, after `session_seconds` of this process."""
        return {"step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "pos": self.pos,
                "order": [list(map(int, b)) for b in self.order], "val_loss": val_loss,
                "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                "tokens_seen": self.tokens_seen, "elapsed": self.elapsed_before + session_seconds,
                "seed": self.seed, "rng": RNG_NOTE, "reason": reason, "run": self.run, "config": self.config,
                "resumes": self.resumes}

    @classmethod
    def from_file(cls, folder: Path) -> "TrainerState":
        """A checkpoint's trainer_state.json, checked field by field: a wrong type names its file and field."""
        file = folder / STATE_FILE
        try:
            saved = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: unreadable ({exc})") from None
        problem = state_problem(saved)
        if problem:
            raise CheckpointError(f"{file}: {problem}")
        return cls(step=saved["step"], total_steps=saved.get("total_steps"), epoch=saved["epoch"],
                   pos=saved["pos"], order=saved["order"], best_val=saved.get("best_val_loss") or math.inf,
                   tokens_seen=saved.get("tokens_seen", 0), elapsed_before=saved.get("elapsed", 0.0),
                   seed=saved.get("seed", 0), run=saved.get("run"), config=saved.get("config"),
                   resumes=saved.get("resumes", []))


def find_resume(resume_from: str | None, store: CheckpointStore,
                warn: Callable[[str], None]) -> tuple[Path, TrainerState] | None:
    """The checkpoint `--resume` continues from (a checkpoint folder as given, else the run's newest usable
    one, an unusable one skipped with a warning) and its state; None when not resuming."""
    if not resume_from:
        return None
    path = Path(resume_from).expanduser()
    if resume_from != "latest" and (path / STATE_FILE).is_file():
        candidates = [path]
    else:
        candidates = [c.path for c in store.newest_first()]
    reasons = []
    for folder in candidates:  # newest first; an unusable one falls back to the one before
        try:
            state = TrainerState.from_file(folder)
            problem = checkpoint_problem(folder)
            if problem:
                raise CheckpointError(problem)
            return folder, state
        except CheckpointError as exc:
            reasons.append(str(exc))
            if len(candidates) > 1:
                warn(f"skipping unusable checkpoint {folder.name}: {exc}")
    more = f" (and {len(reasons) - 1} older checkpoint(s) unusable too)" if len(reasons) > 1 else ""
    raise TrainingError(f"cannot resume: {reasons[0]}{more}", "checkpoint")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# What resume reads from trainer_state.json: field -> (check, what it must be, required)
STATE_FIELDS = {
    "step": (_is_int, "a non-negative integer", True),
    "epoch": (_is_int, "a non-negative integer", True),
    "pos": (_is_int, "a non-negative integer", True),
    "order": (lambda x: isinstance(x, list) and all(isinstance(b, list) and b and all(_is_int(i) for i in b)
                                                    for b in x), "a list of batches (lists of row numbers)", True),
    "total_steps": (_is_int, "a non-negative integer", False),
    "tokens_seen": (_is_int, "a non-negative integer", False),
    "elapsed": (_is_number, "a number of seconds", False),
    "best_val_loss": (lambda x: x is None or _is_number(x), "a number or null", False),
    "run": (lambda x: isinstance(x, dict), "an object", False),
    "resumes": (lambda x: isinstance(x, list), "a list", False),
}


def state_problem(state) -> str | None:
    """What is wrong with a trainer state, naming the field; None when resume can use it."""
    if not isinstance(state, dict):
        return f"must be a JSON object, got {type(state).__name__}"
    for name, (check, what, required) in STATE_FIELDS.items():
        if name not in state:
            if required:
                return f"field {name!r} is missing"
            continue
        if not check(state[name]):
            return f"field {name!r} must be {what}, got {json.dumps(state[name])[:40]}"
    if state["order"] and state["pos"] > len(state["order"]):
        return f"field 'pos' ({state['pos']}) is past the end of 'order' ({len(state['order'])} batches)"
    return None
