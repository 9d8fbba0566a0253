"""Config values checked: a YAML/form value coerced to its field's type and range, cross-field checks,
the run name, and the checks that need the run's step count."""

from __future__ import annotations

import difflib
import math
from typing import Any

from engine.config.schema import COLUMN_FIELDS, SOURCES_TYPE, SPECS, Config, ConfigIssue, FieldSpec, show_number, \
    show_value


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        t, "a list of strings")  # (data.path and data.columns say what they expect themselves)


# The words a YAML value, a form or an environment switch (engine.model.loading.env_switch) may use for a bool.
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def coerce(spec: FieldSpec, value: Any) -> tuple[Any, str | None]:
    """Turn a YAML/form value into the field's type, or say why it cannot be."""
    t = spec.type
    if t is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS, None
        return None, f"expected true or false, got {show_value(value)}"
    if t is int:
        if isinstance(value, bool):
            return None, f"expected an integer, got {show_value(value)}"
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value), None
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", "")), None
            except ValueError:
                pass
        return None, f"expected an integer, got {show_value(value)}"
    if t is float:
        if isinstance(value, bool):
            return None, f"expected a number, got {show_value(value)}"
        if isinstance(value, (int, float)):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                return None, f"expected a number, got {show_value(value)}"
        else:
            return None, f"expected a number, got {show_value(value)}"
        if not math.isfinite(v):
            return None, f"must be a finite number, got {show_value(value)}"
        return v, None
    if t is str:
        if value is None:
            return "", None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value), None
        return None, f"expected a string, got {show_value(value)}"
    if t == dict[str, str]:
        return coerce_columns(value)
    if t == SOURCES_TYPE:
        return coerce_sources(value)
    # list[str]
    if value is None:
        return [], None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value), None
    return None, f"expected a list of strings, got {show_value(value)}"


def coerce_columns(value: Any) -> tuple[dict | None, str | None]:
    """data.columns: {our field: your column}, from YAML or the form's "prompt=question, label=rating"."""
    if value is None or value == "":
        return {}, None
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            return None, f"write field=column pairs, e.g. prompt=question, completion=answer; got {show_value(value)}"
        value = {k.strip(): c.strip() for k, c in pairs}
    if not isinstance(value, dict):
        return None, f"expected a map of our field to your column, e.g. {{prompt: question}}; got {show_value(value)}"
    for ours, theirs in value.items():
        if ours not in COLUMN_FIELDS:
            close = difflib.get_close_matches(str(ours), COLUMN_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return None, f"{show_value(ours)} is not a field we read{hint}: one of {', '.join(COLUMN_FIELDS)}"
        if not isinstance(theirs, str) or not theirs.strip():
            return None, f"{ours}: name your column (a string), got {show_value(theirs)}"
    return {str(k): v.strip() for k, v in value.items()}, None


def coerce_sources(value: Any) -> tuple[str | list | None, str | None]:
    """data.path: one path (a string), or several with weights: [{path, weight}], or the form's
    "a.jsonl*0.7, b.parquet*0.3" (a path without *weight weighs 1)."""
    if value is None:
        return "", None
    if isinstance(value, str):
        if "," not in value and "*" not in value:
            return value.strip(), None
        value = [_weighted(part.strip()) for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        return None, f"expected a path or a list of {{path, weight}}, got {show_value(value)}"
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"path": item, "weight": 1.0}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"].strip():
            return None, f"entry {i + 1}: expected {{path: FILE, weight: NUMBER}}, got {show_value(item)}"
        if set(item) - {"path", "weight"}:
            return None, f"entry {i + 1}: unknown key {show_value(sorted(set(item) - {'path', 'weight'})[0])}: " \
                         "an entry has path and weight"
        weight = item.get("weight", 1.0)
        if isinstance(weight, str):
            try:
                weight = float(weight)
            except ValueError:
                pass
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            return None, f"entry {i + 1} ({item['path']}): weight must be a positive number, got {show_value(weight)}"
        out.append({"path": item["path"].strip(), "weight": float(weight)})
    return out, None


def _weighted(part: str) -> dict | str:
    path, star, weight = part.rpartition("*")
    return {"path": path.strip(), "weight": weight.strip()} if star else part


def check_range(spec: FieldSpec, value: Any) -> str | None:
    if spec.choices is not None and value not in spec.choices:
        close = difflib.get_close_matches(str(value), spec.choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{show_value(value)} is not {spec.range_text()}{hint}"
    if spec.each is not None and isinstance(value, list):
        for item in value:
            if item not in spec.each:
                close = difflib.get_close_matches(item, spec.each, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"{show_value(item)} is not one we know{hint}: each one of {', '.join(spec.each)}"
    if spec.type in (int, float):
        lo_bad = spec.min is not None and (value <= spec.min if spec.min_open else value < spec.min)
        hi_bad = spec.max is not None and (value >= spec.max if spec.max_open else value > spec.max)
        if lo_bad or hi_bad:
            return f"{show_number(value)} is out of range (valid: {spec.range_text()})"
    return None


def validate(cfg: Config) -> list[ConfigIssue]:
    """Every problem at once: per-field ranges, then cross-field checks and warnings."""
    issues: list[ConfigIssue] = []
    for spec in SPECS.values():
        value = getattr(getattr(cfg, spec.section), spec.name)
        coerced, err = coerce(spec, value)
        if err is None:
            err = check_range(spec, coerced)
        if err:
            issues.append(ConfigIssue(spec.path, err))
    if any(i.severity == "error" for i in issues):
        return issues
    return issues + _cross_checks(cfg)


def _cross_checks(cfg: Config) -> list[ConfigIssue]:
    out: list[ConfigIssue] = []
    err = lambda f, m: out.append(ConfigIssue(f, m, "error"))  # noqa: E731
    warn = lambda f, m: out.append(ConfigIssue(f, m, "warning"))  # noqa: E731
    t, lora, ev, ck = cfg.training, cfg.lora, cfg.evaluation, cfg.checkpoints
    if t.epochs == 0 and t.iterations == 0:
        err("training.iterations", "set epochs or iterations above 0: with both 0 nothing would train")
    if not cfg.model.name.strip():
        err("model.name", "empty: name `embedded`, a local model directory or a hub id")
    if not (cfg.data.path.strip() if isinstance(cfg.data.path, str) else cfg.data.path):
        err("data.path", "empty: name a dataset file, a `datasets` folder or a hub id")
    problem = run_name_problem(cfg.output.run_name)
    if problem:
        err("output.run_name", problem)
    if not lora.target_modules:
        err("lora.target_modules", "empty: name at least one linear layer, e.g. q_proj, v_proj")
    if len(set(lora.target_modules)) != len(lora.target_modules):
        warn("lora.target_modules", "lists a module twice")
    if lora.num_layers == 0:
        err("lora.num_layers", "0 blocks would get adapters: use -1 for all or a positive count")
    if t.iterations > 0:
        total = t.iterations
        if t.warmup_steps >= total:
            err("training.warmup_steps", f"{t.warmup_steps} warmup steps >= {total} total steps: the "
                "learning rate would never reach its peak")
        if ev.every_steps > total:
            warn("evaluation.every_steps", f"every {ev.every_steps} steps but the run has {total}: "
                 "only the final evaluation will run")
        if ck.every_steps > total:
            warn("checkpoints.every_steps", f"every {ck.every_steps} steps but the run has {total}: "
                 "only the final checkpoint will be saved")
    if t.learning_rate > 1e-2:
        warn("training.learning_rate", f"{t.learning_rate:g} is high for LoRA (typical 1e-5 to 5e-4): "
             "expect divergence")
    elif t.learning_rate < 1e-6:
        warn("training.learning_rate", f"{t.learning_rate:g} is so low the adapter will barely move")
    if lora.alpha / lora.rank > 8:
        warn("lora.alpha", f"alpha/rank = {lora.alpha / lora.rank:g}: a large scale often destabilises "
             "training (usual: 1 to 2)")
    if cfg.data.validation_split == 0 and ev.every_steps > 0:
        warn("data.validation_split", "0: no validation loss, so no best checkpoint")
    if t.batch_size * cfg.model.max_seq_length > 262144:
        warn("training.batch_size", f"batch {t.batch_size} x {cfg.model.max_seq_length} tokens is large: "
             "memory may not fit; use gradient accumulation instead")
    if t.method in ("kto", "orpo") and not cfg.data.mask_prompt:
        err("data.mask_prompt", f"{t.method} scores the answers only: a KTO pair needs a prompt to put another "
            "row's answer after, ORPO's odds are the answer's; set it to true (or use sft or dpo)")
    if t.method != "sft" and lora.dropout > 0:
        warn("lora.dropout", f"off for {t.method} (as TRL's disable_dropout): its rewards compare the policy with "
             "the reference, and dropout noise would show as reward")
    if t.method != "kto" and t.undesirable_weight > 0:
        warn("training.undesirable_weight", f"only kto uses it (training.method is {t.method})")
    _heldout_checks(ev, err, warn)
    if cfg.model.trust_remote_code:
        warn("model.trust_remote_code", "on: the model directory may run arbitrary Python code")
    if ck.every_steps and ev.every_steps and ck.keep_best and ck.every_steps % ev.every_steps:
        warn("checkpoints.every_steps", f"{ck.every_steps} is not a multiple of evaluation.every_steps "
             f"({ev.every_steps}): the best checkpoint is judged on stale validation losses")
    return out


def _heldout_checks(ev, err, warn) -> None:
    """The held-out metrics' settings that can be judged without reading a file (a schema file is read when
    the evaluation starts)."""
    import json
    import re
    if ev.heldout_path.strip() and not ev.metrics:
        err("evaluation.metrics", "empty: name at least one metric (e.g. exact, rouge_l), or set "
            "evaluation.heldout_path to \"\" for no held-out evaluation")
    if len(set(ev.metrics)) != len(ev.metrics):
        warn("evaluation.metrics", "lists a metric twice")
    if ev.regex:
        try:
            re.compile(ev.regex)
        except re.error as exc:
            err("evaluation.regex", f"not a regular expression: {exc}")
    if ev.json_schema.lstrip().startswith("{"):
        try:
            json.loads(ev.json_schema)
        except ValueError as exc:
            err("evaluation.json_schema", f"inline JSON that does not parse: {exc}")
    for key, metric in (("regex", "regex"), ("json_schema", "json")):
        if getattr(ev, key) and metric not in ev.metrics:
            warn(f"evaluation.{key}", f"set, but evaluation.metrics does not name {metric}")


def run_name_problem(name: str) -> str | None:
    """The run folder must stay inside output.dir: no path separators, no parent folder; and be a name a
    user can see and type again: not only spaces, no control characters (a newline, a tab)."""
    if not name:
        return None  # a timestamp
    if name.strip() in (".", "..") or any(c in name for c in "/\\\0") or len(name) > 128:
        return f"{show_value(name)} is not a plain folder name (no / or \\, not . or .., at most 128 characters)"
    if not name.strip():
        return f"{show_value(name)} is only spaces: name the run, or leave it empty for a timestamp"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"{show_value(name)} holds control characters (a newline or tab?): use a plain folder name"
    if name != name.strip():
        return f"{show_value(name)} starts or ends with a space: write {name.strip()!r}"
    return None


def check_against_total(cfg: Config, total_steps: int) -> list[ConfigIssue]:
    """Checks that need the real step count (known once the dataset is read)."""
    out = []
    t = cfg.training
    if t.warmup_steps >= total_steps > 0:
        out.append(ConfigIssue("training.warmup_steps", f"{t.warmup_steps} warmup steps >= {total_steps} "
                               "total steps: the learning rate would never reach its peak", "warning"))
    if cfg.evaluation.every_steps > total_steps:
        out.append(ConfigIssue("evaluation.every_steps", f"every {cfg.evaluation.every_steps} steps but "
                               f"the run has {total_steps}: only the final evaluation will run", "warning"))
    return out
