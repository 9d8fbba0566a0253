"""A run folder belongs to one run: its state, the lock a training process holds on it, and the checks
made before anything is written there.

`run_state(folder)` tells a UI what is in a folder (nothing yet, a run to resume, a finished run, or a run
training right now) without touching it. A training process holds `RunLock` for as long as it writes:
an flock on `run.lock` (which holds its PID), so a second process is refused, and a kill -9 leaves no
stale lock (the kernel drops it with the process).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.train.checkpoints import STATE_FILE, STEP_DIR

LOCK_FILE = "run.lock"
# What a run writes at the top of its folder; with `config.step_NNNNNN.yaml` kept by resumes.
RUN_OUTPUTS = ("checkpoints", "adapter", "report.json")
RUN_LOGS = ("metrics.jsonl", "train.log", "config.yaml", "crash.log")


class RunFolderError(RuntimeError):
    """The folder cannot be used for this run; the message says why and what to do."""


@dataclass(frozen=True)
class RunState:
    state: str  # "empty", "interrupted", "finished" or "running"
    last_step: int | None = None  # the newest checkpoint's step, if any
    pid: int | None = None  # the training process, while "running"

    @property
    def resumable(self) -> bool:
        return self.state in ("interrupted", "finished") and self.last_step is not None


def run_state(run_dir: str | os.PathLike) -> RunState:
    """What `run_dir` holds: "running" (a process holds its lock), "interrupted" (checkpoints of a run that
    did not finish: stopped, killed or failed), "finished" (a finished run, or an adapter/report without
    checkpoints) or "empty" (nothing of a run; logs of a run that failed before its first step don't count).
    Reads only: safe on a folder another process trains in."""
    run_dir = Path(run_dir)
    checkpoints = checkpoint_steps(run_dir / "checkpoints")
    last_step = checkpoints[-1] if checkpoints else None
    pid = lock_holder(run_dir)
    if pid is not None:
        return RunState("running", last_step, pid)
    if not holds_run(run_dir):
        return RunState("empty")
    report = _report(run_dir)
    # A finished run resumed for more steps and then killed has checkpoints past its report.
    finished = report.get("status") == "finished" and (last_step or 0) <= (report.get("step") or 0)
    return RunState("finished" if finished or not checkpoints else "interrupted", last_step)


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in `folder`, oldest first. Unlike CheckpointStore.list, it puts
    nothing back: a training process may be between the two renames of a save right now."""
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, names)
                  if m and (folder / m.group(0) / STATE_FILE).is_file())


def holds_run(run_dir: Path) -> bool:
    """Whether a run has left work here that a fresh start would destroy."""
    run_dir = Path(run_dir)
    return _has_entries(run_dir / "checkpoints") or (run_dir / "adapter").exists() or \
        (run_dir / "report.json").exists()


def _has_entries(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except OSError:
        return False


def _report(run_dir: Path) -> dict:
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def lock_holder(run_dir: Path) -> int | None:
    """The PID of the process training in `run_dir` (0 if it wrote none yet), or None when no one holds it."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


class RunLock:
    """The exclusive lock of a run folder for one training process (a context manager)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None
        self.unlocked = ""  # why the folder could not be locked, when it could not

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise RunFolderError(f"{path}: cannot open the run's lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"process {pid}" if pid else "another process"
            raise RunFolderError(f"{self.run_dir}: {who} is training in this run folder; wait for it, stop it, "
                                 "or use another --run-name") from None
        except OSError as exc:  # a file system without flock (some NFS, CIFS and FUSE mounts): train unlocked
            os.close(fd)
            self.unlocked = f"{path}: this file system cannot lock files ({exc.strerror or exc}), so nothing " \
                            "stops a second training in this run folder"
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_written_paths(run_dir: Path) -> None:
    """Refuse a run folder whose outputs are symlinks or lead outside it: a run would write through them
    (a `checkpoints` link to /etc once put files there)."""
    run_dir = Path(run_dir)
    names = [*RUN_OUTPUTS, *RUN_LOGS, LOCK_FILE]
    paths = [run_dir / n for n in names]
    if (run_dir / "checkpoints").is_dir() and not (run_dir / "checkpoints").is_symlink():
        paths += list((run_dir / "checkpoints").iterdir())
    if (run_dir / "adapter").is_dir() and not (run_dir / "adapter").is_symlink():
        paths += list((run_dir / "adapter").iterdir())
    root = run_dir.resolve()
    for path in paths:
        if path.is_symlink() or (path.exists() and not path.resolve().is_relative_to(root)):
            raise RunFolderError(f"{path}: is a symbolic link (to {os.path.realpath(path)}); a run writes only "
                                 f"inside its own folder: remove the link or use another --run-name")


def clear(run_dir: Path) -> None:
    """Remove what an earlier run left in `run_dir` (for --overwrite, or a fresh start after a run that failed
    before its first step); the lock file stays (this process holds it)."""
    run_dir = Path(run_dir)
    for name in RUN_OUTPUTS + RUN_LOGS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for old in run_dir.glob("config.step_*.yaml"):
        old.unlink()


# ---------------------------------------------------------------- what determines a run

# Settings a resume must keep to continue exactly: the data order, the dropout masks, the adapter's shape
# and meaning depend on them. (The global batch, training.batch_size x ranks, is checked on its own.)
FIXED_SETTINGS = ("training.seed", "training.grad_accumulation", "training.method", "training.init_adapter",
                  "data.validation_split", "data.shuffle", "model.name", "model.max_seq_length", "lora.rank", "lora.alpha", "lora.dropout",
                  "lora.target_modules", "lora.num_layers", "lora.use_dora")
# Settings that name where things are, not what is trained: a change is not worth a warning.
PLACES = ("output.dir", "output.run_name", "data.path")


def data_fingerprint(train, valid) -> str:
    """sha256 of the tokenized split (tokens and loss masks, in order): what the run trains and validates
    on, whatever file or formatting it came from."""
    import hashlib

    import numpy as np
    h = hashlib.sha256()
    for part in (train, valid):
        h.update(len(part).to_bytes(8, "little"))
        for example in part:
            tokens = np.ascontiguousarray(example.encoded.tokens, dtype=np.int32)
            h.update(len(tokens).to_bytes(8, "little"))
            h.update(tokens.tobytes())
            h.update(np.packbits(example.encoded.trained).tobytes())
    return h.hexdigest()


def flat_config(cfg_dict: dict) -> dict:
    return {f"{section}.{key}": value for section, values in cfg_dict.items() for key, value in values.items()}


def run_identity(cfg, data, ranks: int) -> dict:
    """What trainer_state.json records so that a resume can tell whether it continues the same run
    (data=None: the settings only, checked before the dataset is read)."""
    flat = flat_config(cfg.to_dict())
    identity = {"batch_size": cfg.training.batch_size, "ranks": ranks, "global_batch": cfg.training.batch_size * ranks,
                "settings": {k: flat[k] for k in FIXED_SETTINGS}}
    if data is not None:
        identity |= {"data_sha256": data_fingerprint(data.train, data.valid), "data_path": cfg.data.path,
                     "train_rows": len(data.train), "valid_rows": len(data.valid)}
    return identity


def resume_conflicts(old: dict, new: dict) -> list[str]:
    """What differs between a checkpoint's run and this one that makes an exact resume impossible."""
    out = []
    if "data_sha256" in new and old.get("data_sha256") != new["data_sha256"]:
        # The fingerprint is of the tokenized split: the file, or how it is read (data.* settings, the template).
        out.append(f"the dataset or its tokenization differs ({old.get('train_rows')} training / "
                   f"{old.get('valid_rows')} validation rows from {old.get('data_path')} then, {new['train_rows']} / "
                   f"{new['valid_rows']} from {new['data_path']} now; the file, data.* settings or the chat "
                   "template changed)")
    if old.get("global_batch") != new["global_batch"]:
        out.append(f"the global batch (training.batch_size x ranks) was {old.get('batch_size')} x "
                   f"{old.get('ranks')} = {old.get('global_batch')}, now {new['batch_size']} x {new['ranks']} = "
                   f"{new['global_batch']}")
    settings = old.get("settings") or {}
    for key in FIXED_SETTINGS:
        if key in settings and settings[key] != new["settings"][key]:
            out.append(f"{key} was {settings[key]!r}, now {new['settings'][key]!r}")
    return out


def config_changes(old_cfg: dict, new_cfg: dict) -> dict:
    """Settings a resume may change (learning rate, length, schedule, intervals...): {key: [old, new]}."""
    old, new = flat_config(old_cfg), flat_config(new_cfg)
    return {k: [old.get(k), v] for k, v in new.items()
            if old.get(k) != v and k not in FIXED_SETTINGS and k not in PLACES}  # a key new since: None
