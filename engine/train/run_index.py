"""Every run under a runs folder (output.dir), read without touching it: status, progress, losses, scores and
settings, for a UI that lists and compares runs. Reading never raises: what a damaged file holds is skipped,
and the run says so in its `notes`.

Status: "running" (a process holds its run.lock), "finished", "stopped" or "failed" (how its last session
ended, from metrics.jsonl, else report.json), "killed" (a session that started and never ended: kill -9,
power loss; resumable from its newest checkpoint).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from engine import protocol as ev
from engine.follow import parse_event
from engine.train.checkpoints import BEST_FILE, STATE_FILE
from engine.train.run_folder import LOCK_FILE, RunFolderError, RunLock, checkpoint_steps, lock_holder

# What makes a folder under output.dir a run (one that failed before its first step has only logs).
RUN_FILES = ("metrics.jsonl", "report.json", "config.yaml", "checkpoints", "adapter", LOCK_FILE)
# report.json blocks whose numbers are evaluation scores (held-out tool calls, final answers, ...).
SCORE_BLOCKS = ("evaluation", "scores", "tool_calls", "answers")
WRAPPERS = ("evaluation", "scores", "metrics")  # names of blocks that hold scores, left out of the keys
NOT_SCORES = ("items", "prompts", "no_tool_prompts", "max_tokens")  # counts and settings beside them
MAX_CONFIG_BYTES = 1 << 20


class RunIndexError(RuntimeError):
    """A run cannot be deleted; the message says why."""


@dataclass
class RunInfo:
    name: str
    path: Path
    status: str  # "running", "finished", "stopped", "failed" or "killed"
    method: str | None = None
    step: int | None = None  # steps done (the newest logged)
    total_steps: int | None = None
    seconds: float | None = None  # training time
    best_val_loss: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # "tool_calls.exact": 0.8, ...
    started: float | None = None  # epoch seconds of the first session's start
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    config: dict = field(default_factory=dict)  # {section: {key: value}}, as the run last used it
    last_checkpoint: int | None = None  # the newest complete checkpoint's step
    pid: int | None = None  # the training process, while running
    adapter: Path | None = None  # the final adapter, else the best or newest checkpoint
    message: str = ""  # why it failed
    notes: list[str] = field(default_factory=list)  # what could not be read

    @property
    def resumable(self) -> bool:
        return self.status in ("killed", "stopped", "failed") and self.last_checkpoint is not None


@dataclass
class Metrics:
    """What metrics.jsonl says about a run."""
    train: dict[int, float] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)
    sessions: list[list[float]] = field(default_factory=list)  # [started, last event] time per session
    total_steps: int | None = None
    end: ev.Event | None = None  # Finished or Failed after the last Started, if any
    bad: list[str] = field(default_factory=list)


_metrics_cache: dict[str, tuple[tuple[int, int], Metrics]] = {}  # a rescan re-reads only changed files
_config_cache: dict[str, tuple[tuple[int, int], object]] = {}  # config.yaml parsed, likewise (YAML is slow)


def list_runs(output_dir: str | os.PathLike) -> list[RunInfo]:
    """Every run folder directly under `output_dir`, newest first ([] when there is no such folder)."""
    root = Path(output_dir).expanduser()
    try:
        folders = [Path(e.path) for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return []
    runs = [run for run in map(read_run, folders) if run is not None]
    return sorted(runs, key=lambda r: (r.started or 0.0, r.name), reverse=True)


def read_run(run_dir: str | os.PathLike) -> RunInfo | None:
    """What `run_dir` holds, or None when it holds nothing of a run."""
    run_dir = Path(run_dir)
    try:
        return _read_run(run_dir)
    except Exception as exc:  # a folder we may not enter, a file gone mid-read, ...: list it, say why
        return RunInfo(run_dir.name, run_dir, "killed", notes=[f"unreadable: {type(exc).__name__}: {exc}"])


def _read_run(run_dir: Path) -> RunInfo | None:
    if not any((run_dir / name).exists() for name in RUN_FILES):
        return None
    run = RunInfo(run_dir.name, run_dir, "killed", pid=lock_holder(run_dir))
    steps = checkpoint_steps(run_dir / "checkpoints")
    run.last_checkpoint = steps[-1] if steps else None
    report = _read_json(run_dir / "report.json", run.notes)
    metrics = _read_metrics(run_dir / "metrics.jsonl", run.notes)
    newest = run_dir / "checkpoints" / f"step_{steps[-1]:06d}" if steps else None
    newest_state = _read_json(newest / STATE_FILE, run.notes) if newest else {}
    run.config = _read_config(run_dir, report, newest_state, run.notes)
    run.status, report_current = _status(run, report, metrics)
    run.train_curve, run.val_curve = sorted(metrics.train.items()), sorted(metrics.val.items())
    training = run.config.get("training") if isinstance(run.config.get("training"), dict) else {}
    run.method = next((m for m in (training.get("method"), report.get("method")) if isinstance(m, str) and m), None)
    run.step = max((s for s in (_int(report.get("step")), max(metrics.train, default=None), run.last_checkpoint)
                    if s is not None), default=None)
    run.total_steps = metrics.total_steps or _int(report.get("total_steps")) or _int(newest_state.get("total_steps"))
    run.seconds = _duration(report if report_current else {}, metrics, newest_state)
    bests = [_number(report.get("best_val_loss")), min(metrics.val.values(), default=None),
             _number(_read_json(run_dir / "checkpoints" / BEST_FILE, []).get("val_loss"))]
    run.best_val_loss = min((b for b in bests if b is not None and math.isfinite(b)), default=None)
    run.scores = scores(report)
    run.started = metrics.sessions[0][0] if metrics.sessions else _earliest_mtime(run_dir)
    run.adapter = _adapter(run_dir, steps)
    if run.status == "killed" and run.last_checkpoint is None:
        run.notes.append("no checkpoint was saved: nothing to resume")
    return run


def _status(run: RunInfo, report: dict, metrics: Metrics) -> tuple[str, bool]:
    """The run's status, and whether report.json describes its last session."""
    if run.pid is not None:
        return "running", False
    if isinstance(end := metrics.end, ev.Failed):
        run.message = end.message
        return "failed", False
    if isinstance(end, ev.Finished):
        return ("stopped" if end.stopped_early else "finished"), bool(report)
    if metrics.sessions:
        return "killed", False  # a session began and never ended
    status = report.get("status")
    if status in ("finished", "stopped", "failed") and (run.last_checkpoint or 0) <= (_int(report.get("step")) or 0):
        return status, True
    return "killed", False


def _read_metrics(path: Path, notes: list[str]) -> Metrics:
    """metrics.jsonl's curves, sessions and end (Step/Eval read directly, the rest via engine.follow)."""
    try:
        st = path.stat()
    except OSError:
        notes.append("no metrics.jsonl: no loss curves")
        return Metrics()
    key = (st.st_size, st.st_mtime_ns)
    if (cached := _metrics_cache.get(str(path))) is None or cached[0] != key:
        cached = _metrics_cache[str(path)] = (key, _parse_metrics(path))
    metrics = cached[1]
    if metrics.bad:
        notes.append(f"metrics.jsonl: {len(metrics.bad)} unreadable line(s) skipped ({metrics.bad[0]})")
    return metrics


def _parse_metrics(path: Path) -> Metrics:
    out = Metrics()
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError as exc:
        out.bad.append(f"unreadable: {exc.strerror or exc}")
        return out
    for number, line in enumerate(lines, 1):
        if not line.endswith("\n"):
            break  # a line still being written
        try:
            data = json.loads(line)
        except ValueError:
            out.bad.append(f"line {number}: not JSON")
            continue
        if not isinstance(data, dict):
            out.bad.append(f"line {number}: not a JSON object")
            continue
        kind, moment = data.get("event"), _number(data.get("time"))
        if kind in ("Step", "Eval"):
            step, value = _int(data.get("step")), _number(data.get("loss" if kind == "Step" else "val_loss"))
            if step is None or value is None:
                out.bad.append(f"line {number}: a {kind} event without a step or loss")
                continue
            (out.train if kind == "Step" else out.val)[step] = value  # a resume's repeat replaces the first
        elif kind in ("Started", "Finished", "Failed"):  # rare: checked in full by engine.follow's parser
            event, problem = parse_event(line)
            if problem or event is None:
                out.bad.append(f"line {number}: {problem or 'unreadable'}")
                continue
            if isinstance(event, ev.Started):
                out.sessions.append([event.time, event.time])
                out.total_steps, out.end = event.total_steps, None
            else:
                out.end = event
        if out.sessions and moment is not None and math.isfinite(moment):
            out.sessions[-1][1] = max(out.sessions[-1][1], moment)  # the session's last event so far
    return out


def _read_json(path: Path, notes: list[str]) -> dict:
    """A JSON object file's contents ({} when missing; said in `notes` when unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name}: unreadable ({getattr(exc, 'strerror', None) or exc})")
        return {}
    if not isinstance(data, dict):
        notes.append(f"{path.name}: not a JSON object")
        return {}
    return data


def _read_config(run_dir: Path, report: dict, state: dict, notes: list[str]) -> dict:
    """The settings the run last used: config.yaml (as the app reads it), else the report's or a checkpoint's."""
    from engine.config.loading import parse_yaml
    from engine.config.schema import ConfigError
    path = run_dir / "config.yaml"
    try:
        st = path.stat()
        if st.st_size > MAX_CONFIG_BYTES:
            raise ValueError("larger than 1 MiB")
        key = (st.st_size, st.st_mtime_ns)
        if (cached := _config_cache.get(str(path))) is None or cached[0] != key:
            cached = _config_cache[str(path)] = (key, parse_yaml(path.read_text(encoding="utf-8", errors="replace"),
                                                                 path.name))
        data = cached[1]
        if _is_config(data):
            return copy.deepcopy(data)  # the caller's own: the cached one stays as read
        notes.append("config.yaml: not a mapping of sections")
    except FileNotFoundError:
        pass
    except ConfigError as exc:
        notes.append(f"config.yaml: unreadable ({exc.issues[0].message})")
    except (OSError, ValueError) as exc:
        notes.append(f"config.yaml: unreadable ({getattr(exc, 'strerror', None) or exc})")
    for fallback in (report.get("config"), state.get("config")):
        if _is_config(fallback):
            return fallback
    notes.append("no readable settings")
    return {}


def _is_config(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) for v in data.values())


def _duration(report: dict, metrics: Metrics, state: dict) -> float | None:
    """Training time: the last session's report, else metrics.jsonl's sessions, else the newest checkpoint."""
    spans = sum(last - first for first, last in metrics.sessions) if metrics.sessions else None
    found = (_number(report.get("seconds")), spans, _number(state.get("elapsed")))
    return next((value for value in found if value is not None and math.isfinite(value)), None)


def scores(report: dict) -> dict[str, float]:
    """A report's evaluation numbers, flattened: {"tool_calls.exact": 0.8}; counts left out."""
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(prefix if key in WRAPPERS else f"{prefix}.{key}" if prefix else str(key), inner)
        elif (number := _number(value)) is not None and math.isfinite(number) and \
                prefix.rsplit(".", 1)[-1] not in NOT_SCORES:
            out[prefix] = number

    for block in SCORE_BLOCKS:
        if isinstance(report.get(block), dict):
            walk("" if block in WRAPPERS else block, report[block])
    return out


def _adapter(run_dir: Path, steps: list[int]) -> Path | None:
    """What to chat with: the final adapter, else the best checkpoint, else the newest."""
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir / "adapter"
    best = _read_json(run_dir / "checkpoints" / BEST_FILE, []).get("name")
    names = ([best] if isinstance(best, str) else []) + [f"step_{s:06d}" for s in reversed(steps)]
    for name in names:
        if (run_dir / "checkpoints" / name / "adapter_config.json").is_file():
            return run_dir / "checkpoints" / name
    return None


def _earliest_mtime(run_dir: Path) -> float | None:
    return min(((run_dir / n).stat().st_mtime for n in RUN_FILES if (run_dir / n).exists()), default=None)


# ---------------------------------------------------------------- comparing and deleting runs

def flat_settings(config: dict) -> dict:
    """{section: {key: value}} as {"section.key": value}."""
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def config_diff(runs: list[RunInfo], ignore: tuple[str, ...] = ("output.run_name",)) -> dict[str, list]:
    """{"training.learning_rate": [value per run, None where absent]} for the settings that differ."""
    flats = [flat_settings(run.config) for run in runs]
    keys = dict.fromkeys(key for flat in flats for key in flat)
    same = lambda values: len({json.dumps(v, sort_keys=True, default=str) for v in values}) <= 1  # noqa: E731
    return {key: values for key in keys if key not in ignore
            and not same(values := [flat.get(key) for flat in flats])}


def run_settings(run: RunInfo):
    """The run's own settings as a Config to resume with, and the problems reading them (defaults kept)."""
    from engine.config.loading import from_dict
    cfg, issues = from_dict(run.config, str(run.path / "config.yaml"))
    return cfg, [f"{i.field}: {i.message}" if i.field else i.message for i in issues]


def delete_run(run_dir: str | os.PathLike) -> None:
    """Remove a run folder; refused for a live run (its lock is held meanwhile, so none starts there)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise RunIndexError(f"{run_dir}: not a run folder")
    if (pid := lock_holder(run_dir)) is not None:
        raise RunIndexError(f"{run_dir}: {f'process {pid}' if pid else 'another process'} is training in it: "
                            "stop it first")
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except RunFolderError as exc:  # a process took it just now
        raise RunIndexError(str(exc)) from None
    _metrics_cache.pop(str(run_dir / "metrics.jsonl"), None)
    _config_cache.pop(str(run_dir / "config.yaml"), None)
    try:
        shutil.rmtree(run_dir)
    except OSError as exc:
        raise RunIndexError(f"{exc.filename or run_dir}: cannot remove ({exc.strerror or exc})") from None
    finally:
        lock.release()


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value) -> float | None:
    """A JSON number (NaN and infinities as run_log writes them, in words) or None."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

