"""The base model against the tuned one on held-out items, with the configured metrics: the "evaluation"
block of a run's report.json (`lora-tui train --eval-only`, and the end of a run) and its printed table.

One model is in memory: the tuned model answers, then the same model with its adapters swapped out
(adapters_disabled) answers as the base. Answers are greedy whatever evaluation.temperature says, so that
a score does not move between two evaluations of the same adapter.
"""

from __future__ import annotations

from typing import Callable

from engine.config.schema import Config
from engine.evaluate.batched import batched_answers
from engine.evaluate.heldout import HeldoutItem, load_items
from engine.evaluate.metrics import MetricOptions, score

KEEP_EXAMPLES = 3


def load_heldout(cfg: Config, limit: int | None = None) -> tuple[list[HeldoutItem], MetricOptions]:
    """evaluation.heldout_path's first items (`limit`, else evaluation.heldout_limit; 0 = all) and the metrics'
    options; DatasetError for a bad file or row, ConfigError for an unreadable evaluation.json_schema."""
    e = cfg.evaluation
    options = MetricOptions.from_config(e)
    n = e.heldout_limit if limit is None else limit
    return load_items(e.heldout_path, cfg.data.columns, n, e.metrics, options), options


def compare(model, tokenizer, items: list[HeldoutItem], cfg: Config, options: MetricOptions,
            should_stop: Callable[[], bool] | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> dict | None:
    """{"metrics": {name: {"base", "tuned"}}, "items", "heldout", "examples"}: each metric's mean over the
    items; None when `should_stop` ended it (asked between batches). `progress(which, done, total)`."""
    from engine.model.adapters import adapters_disabled
    e = cfg.evaluation
    prompts = [(item.messages, item.tools) for item in items]
    answers = {}
    model.eval()
    for which in ("tuned", "base"):
        def on_batch(done, total, which=which):
            if progress is not None:
                progress(which, done, total)
        if which == "base":
            with adapters_disabled(model):
                answers[which] = batched_answers(model, tokenizer, prompts, e.max_tokens, e.heldout_batch_size,
                                                 should_stop, on_batch)
        else:
            answers[which] = batched_answers(model, tokenizer, prompts, e.max_tokens, e.heldout_batch_size,
                                             should_stop, on_batch)
        if answers[which] is None:
            return None
    scores = {which: [{m: score(m, answer, item.reference, options, item.schema) for m in e.metrics}
                      for item, answer in zip(items, answers[which])] for which in answers}
    means = {m: {which: _mean([s[m] for s in scores[which]]) for which in ("base", "tuned")} for m in e.metrics}
    examples = [{"id": item.id or item.where, "prompt": _last_turn(item), "reference": item.reference,
                 "base": answers["base"][i], "tuned": answers["tuned"][i],
                 "scores": {which: scores[which][i] for which in ("base", "tuned")}}
                for i, item in enumerate(items[:KEEP_EXAMPLES])]
    return {"metrics": means, "items": len(items), "heldout": e.heldout_path, "max_tokens": e.max_tokens,
            "examples": examples}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _last_turn(item: HeldoutItem) -> str:
    return item.messages[-1]["content"] if item.messages else ""


def table(rows: dict[str, dict]) -> str:
    """metric | base | tuned | delta, one line each, aligned: `rows` is {name: {"base", "tuned"}} (an
    evaluation block's "metrics", with any other rows such as the validation loss)."""
    def show(x):
        return "-" if x is None else f"{x:.4f}"

    lines = [("metric", "base", "tuned", "delta")]
    for name, v in rows.items():
        base, tuned = v.get("base"), v.get("tuned")
        delta = None if base is None or tuned is None else tuned - base
        lines.append((name, show(base), show(tuned), "-" if delta is None else f"{delta:+.4f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)
