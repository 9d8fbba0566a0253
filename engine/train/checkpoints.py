"""Checkpoints that a crash cannot half-write, and the policy of which to keep.

A checkpoint is a folder `step_000120/` holding the adapter in mlx-lm's format (so any checkpoint can be
chatted with or served), the optimizer state, and `trainer_state.json` (step, data order and position,
RNG, best validation loss: TrainerState, in trainer_state.py). It is built in a hidden temp folder, every
file fsynced, then renamed into place: a reader sees the old set of checkpoints or the new one, never a
partial folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine import atomic

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    val_loss: float | None


class CheckpointStore:
    def __init__(self, folder: Path, keep_last: int = 3, keep_best: bool = True):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.keep_best = keep_best

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first (temp folders of interrupted writes are ignored)."""
        if not self.folder.is_dir():
            return []
        for moved in self.folder.glob(".step_*.old.tmp"):  # a re-save killed between its two renames
            atomic.recover(self.folder / moved.name[1:-len(".old.tmp")])
        out = []
        for child in self.folder.iterdir():
            m = STEP_DIR.match(child.name)
            if m and (child / STATE_FILE).is_file():
                out.append(CheckpointInfo(int(m.group(1)), child, self._val_loss(child)))
        return sorted(out, key=lambda c: c.step)

    @staticmethod
    def _val_loss(path: Path) -> float | None:
        try:
            value = json.loads((path / STATE_FILE).read_text()).get("val_loss")
        except (OSError, ValueError, AttributeError):  # AttributeError: a state that is not an object
            return None
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def best(self) -> CheckpointInfo | None:
        try:
            name = json.loads((self.folder / BEST_FILE).read_text())["name"]
        except (OSError, ValueError, KeyError):
            return None
        return next((c for c in self.list() if c.path.name == name), None)

    def save(self, step: int, write: Callable[[Path], None], state: dict, is_best: bool) -> Path:
        """`write(tmp_folder)` writes the tensors; state goes to trainer_state.json last."""
        final = self.folder / f"step_{step:06d}"
        with atomic.folder(final) as tmp:  # re-saving a step (a stop right after an interval save) replaces it
            write(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(state))
        if is_best and self.keep_best:
            atomic.write_json(self.folder / BEST_FILE, {"name": final.name, "step": step,
                                                        "val_loss": state.get("val_loss")})
        self.prune()
        return final

    def prune(self) -> list[Path]:
        """Keep the newest `keep_last` checkpoints and the best; delete the rest and stale temp folders."""
        items = self.list()
        best = self.best() if self.keep_best else None
        keep = {c.path for c in items[-self.keep_last:]}
        if best:
            keep.add(best.path)
        for c in items:
            if c.path not in keep:
                shutil.rmtree(c.path, ignore_errors=True)
        for child in self.folder.iterdir():
            if child.name.startswith(".step_") and child.name.endswith(".tmp"):
                shutil.rmtree(child, ignore_errors=True)
        return sorted(keep)

    def newest_first(self) -> list[CheckpointInfo]:
        """Candidates for `--resume`, newest first (the caller falls back on a bad one)."""
        items = list(reversed(self.list()))
        if not items:
            raise CheckpointError(f"no checkpoint to resume in {self.folder}")
        return items


def safetensors_problem(file: Path) -> str | None:
    """Whether a safetensors file is whole: a readable JSON header whose tensors end exactly at the file's
    end (a truncated save, a zero-length file or another format fails); None when whole."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{file}: truncated ({size} bytes)"
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                return f"{file}: truncated or not a safetensors file (header of {n} bytes in a {size}-byte file)"
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        return f"{file}: missing"
    except OSError as exc:
        return f"{file}: unreadable ({exc.strerror or exc})"
    except ValueError:
        return f"{file}: not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{file}: not a safetensors file"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{file}: truncated ({size:,} bytes, its header describes {expected:,})"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (its tensors are not whole), or None."""
    for name in ("adapters.safetensors", "optimizer.safetensors", "reference_logps.safetensors"):
        if name.startswith("reference") and not (path / name).exists():
            continue  # only KTO and DPO runs save reference log-probs
        problem = safetensors_problem(path / name)
        if problem:
            return problem
    return None
