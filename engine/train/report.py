"""The end of a run: report.json (losses, memory, checkpoints, settings) and the sample answers of the
base model and the adapter to the configured prompts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from engine import atomic
from engine import protocol as ev
from engine.config.schema import Config, EvaluationConfig
from engine.model.memory import memory_stats
from engine.train.control import RunControl
from engine.train.prepare import Prepared
from engine.train.trainer_state import TrainerState


def write_report(cfg: Config, setup: Prepared, state: TrainerState, status: str, session_seconds: float,
                 last_loss: float | None, adapter_dir: Path, control: RunControl, emit: ev.Listener) -> dict:
    """report.json, written first without the samples (a stop while they are generated loses nothing),
    then again with them, then with the held-out evaluation (evaluation.heldout_path, if set)."""
    report = run_report(cfg, setup, state, status, session_seconds, last_loss, adapter_dir)
    atomic.write_json(setup.run_dir / "report.json", report)
    report["samples"] = sample_answers(setup.model, setup.tokenizer, cfg.evaluation, control,
                                       lambda prompt, base, adapter: emit(ev.Sample(state.step, prompt, base, adapter)))
    if report["samples"]:
        atomic.write_json(setup.run_dir / "report.json", report)
    if cfg.evaluation.heldout_path and not control.stop_requested:
        evaluation = heldout_evaluation(cfg, setup, adapter_dir, control, emit)
        if evaluation is not None:
            report["evaluation"] = evaluation
            atomic.write_json(setup.run_dir / "report.json", report)
    return report


def heldout_evaluation(cfg: Config, setup: Prepared, adapter_dir: Path, control: RunControl,
                       emit: ev.Listener) -> dict | None:
    """The held-out metrics, base against the adapter just trained (engine/evaluate/compare.py): the first
    evaluation.heldout_limit items, answered in batches; None when a stop came first (asked between
    batches). A bad held-out file does not fail a finished run: it is a warning, and the block says why."""
    from engine.config.schema import ConfigError
    from engine.data import DatasetError
    from engine.evaluate.compare import compare, load_heldout
    try:
        items, options = load_heldout(cfg)
    except (DatasetError, ConfigError) as exc:
        emit(ev.Warning(f"held-out evaluation skipped: {exc}"))
        return {"error": str(exc), "heldout": cfg.evaluation.heldout_path}
    block = compare(setup.model, setup.tokenizer, items, cfg, options, lambda: control.stop_requested)
    if block is not None:
        block["adapter"] = str(adapter_dir)
    return block


def run_report(cfg: Config, setup: Prepared, state: TrainerState, status: str, session_seconds: float,
               last_loss: float | None, adapter_dir: Path) -> dict:
    """The run in numbers: losses, memory, throughput, checkpoints, data and settings (samples to come)."""
    import mlx.core as mx

    from engine.train.validation import perplexity
    best = setup.store.best()
    mem = memory_stats()
    estimate = setup.memory_estimate
    return {
        "status": status, "step": state.step, "total_steps": setup.total_steps,
        "final_train_loss": last_loss,
        "best_val_loss": None if math.isinf(state.best_val) else state.best_val,
        "best_val_perplexity": None if math.isinf(state.best_val) or setup.objective else perplexity(state.best_val),
        "method": cfg.training.method, "init_adapter": cfg.training.init_adapter or None,
        "preference": setup.objective.summary() if setup.objective else None,
        "last_val_loss": state.last_val,
        "trainable_params": setup.trainable, "total_params": setup.total_params,
        "tokens_seen": state.tokens_seen,
        "seconds": round(state.elapsed_before + session_seconds, 2),
        "seconds_this_session": round(session_seconds, 2),
        "tokens_per_sec": round(state.session_tokens / session_seconds, 1) if session_seconds > 0 else None,
        "peak_memory": {"mlx_peak_bytes": mx.get_peak_memory(), "rss_bytes": mem.rss_bytes,
                        "estimated_bytes": estimate.total if estimate else None},
        "device": str(mx.default_device()), "blas": setup.blas.name, "dtype": setup.info.dtype,
        "adapter": str(adapter_dir), "best_checkpoint": str(best.path) if best else None,
        "checkpoints": [str(c.path) for c in setup.store.list()],
        "losses": state.losses, "data": setup.data.report.to_dict(), "config": cfg.to_dict(),
        "resumes": state.resumes, "samples": [],
        "distributed": setup.world.summary() if setup.world else None,
    }


def sample_answers(model, tokenizer, e: EvaluationConfig, control: RunControl,
                   on_sample: Callable[[str, str, str], None]) -> list[dict]:
    """The configured prompts answered by the base model and by the adapter (one model in memory); a stop
    ends them between prompts or tokens."""
    from engine.generate.reply import GenerationSettings
    from engine.model.adapters import adapters_disabled
    settings = GenerationSettings(e.max_tokens, e.temperature, e.top_p)
    out = []
    model.eval()
    for prompt in e.sample_prompts:
        messages = [{"role": "user", "content": prompt}]
        adapter = _answer(model, tokenizer, messages, settings, control)
        with adapters_disabled(model):
            base = None if adapter is None else _answer(model, tokenizer, messages, settings, control)
        if base is None:
            break  # a user who pressed stop wants out, not more generation
        on_sample(prompt, base, adapter)
        out.append({"prompt": prompt, "base": base, "adapter": adapter})
    return out


def _answer(model, tokenizer, messages: list[dict], settings, control: RunControl) -> str | None:
    """The model's reply, or None when a stop came first."""
    from contextlib import closing

    from engine.generate.reply import stream_reply
    parts = []
    if control.stop_requested:
        return None
    with closing(stream_reply(model, tokenizer, messages, settings)) as chunks:
        for chunk in chunks:
            if control.stop_requested:
                return None
            parts.append(chunk.text)
    return None if control.stop_requested else "".join(parts).strip()
