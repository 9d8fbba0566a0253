"""The run's logs: metrics.jsonl (one JSON event per line) and a readable train.log."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

from engine.protocol import CheckpointSaved, Eval, Failed, Finished, Phase, Sample, Started, Step
from engine.protocol import Warning as WarningEvent

def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no NaN; keep it readable
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def describe(event) -> str | None:
    """One human-readable log line per event (None for events not worth a line)."""
    if isinstance(event, Started):
        return (f"started: {event.total_steps} steps from step {event.start_step}, {event.train_examples} train / "
                f"{event.valid_examples} validation conversations, effective batch {event.effective_batch}, "
                f"{event.trainable_params:,} of {event.total_params:,} parameters trainable, {event.device}, "
                f"BLAS {event.blas}, {event.dtype}" + "".join(f"\n  data: {line}" for line in event.data))
    if isinstance(event, Step):
        return (f"step {event.step}/{event.total_steps}: loss {event.loss:.4f}, lr {event.learning_rate:.3g}, "
                f"grad norm {event.grad_norm:.3f}, {event.tokens_per_sec:.0f} tok/s, "
                f"peak {_gb(event.memory.mlx_peak_bytes)}, rss {_gb(event.memory.rss_bytes)}"
                + (f"; {event.preference.describe()}" if event.preference else ""))
    if isinstance(event, Eval) and event.preference:
        return (f"step {event.step}: validation loss {event.val_loss:.4f}, {event.preference.describe()}"
                + (" (best)" if event.is_best else ""))
    if isinstance(event, Eval):
        return (f"step {event.step}: validation loss {event.val_loss:.4f}, perplexity {event.perplexity:.2f}"
                + (" (best)" if event.is_best else ""))
    if isinstance(event, CheckpointSaved):
        return f"step {event.step}: checkpoint saved ({event.reason}) to {event.path}" + (" [best]" if event.is_best else "")
    if isinstance(event, Sample):
        return f"sample: {event.prompt!r}\n  base:    {event.base!r}\n  adapter: {event.adapter!r}"
    if isinstance(event, WarningEvent):
        return f"warning: {event.message}"
    if isinstance(event, Finished) and not event.adapter_path:
        return f"stopped at step {event.step}, before training: nothing saved"
    if isinstance(event, Finished):
        return f"finished at step {event.step}" + (" (stopped)" if event.stopped_early else "") + \
            f"; adapter in {event.adapter_path}; report {event.report_path}"
    if isinstance(event, Failed):
        return f"FAILED at step {event.step}: {event.message}" + \
            (f"; last good checkpoint: {event.last_checkpoint}" if event.last_checkpoint else "")
    if isinstance(event, Phase):
        return None
    return f"{event.kind.lower()} at step {getattr(event, 'step', '?')}"


class RunLog:
    """A listener writing metrics.jsonl and train.log in the run directory (append: resume continues them)."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._log = open(run_dir / "train.log", "a", encoding="utf-8")

    def __call__(self, event) -> None:
        with self._lock:
            if self._metrics.closed:
                return
            if not isinstance(event, Phase):
                self._metrics.write(json.dumps(_jsonable(event.to_dict())) + "\n")
                self._metrics.flush()
            line = describe(event)
            if line:
                self._log.write(line + "\n")
                self._log.flush()

    def close(self) -> None:
        with self._lock:
            for fh in (self._metrics, self._log):
                if not fh.closed:
                    fh.flush()
                    os.fsync(fh.fileno())
                    fh.close()
