"""Typed configuration: dataclasses per category, YAML load/save, env overrides, validation.

Every field carries its help text and valid range in `field(metadata=...)`, so the same source feeds
validation, the TUI's forms, `config.yaml`'s comments and the README's reference table.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from engine import atomic

ENV_PREFIX = "LORA_TUI__"  # LORA_TUI__TRAINING__LEARNING_RATE=2e-4 overrides training.learning_rate


def opt(default, help: str, *, min=None, max=None, min_open=False, max_open=False, choices=None):
    """A config field with its help text and valid range."""
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "max_open": max_open,
            "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt("embedded", "Base model: `embedded` (SmolLM2-135M-Instruct, no download), a local "
                    "MLX/Hugging Face directory, or a hub id such as mlx-community/Mistral-7B-Instruct-v0.3-4bit")
    dtype: str = opt("auto", "Compute dtype of the base weights; auto = float32 on CPU, bfloat16 on a GPU",
                     choices=["auto", "float32", "bfloat16", "float16"])
    quantized_base: str = opt("auto", "A quantized base: keep it quantized (QLoRA) or dequantize it; "
                              "auto = dequantize on CPU (quantized matmuls are slow there), keep on a GPU",
                              choices=["auto", "keep", "dequantize"])
    max_seq_length: int = opt(1024, "Longest training sequence in tokens; longer conversations are truncated",
                              min=16, max=131072)
    trust_remote_code: bool = opt(False, "Allow a model directory to run its own Python code (off: safer)")
    cache_dir: str = opt("~/.cache/lora-tui", "Where the embedded model is imported and hub models are cached")


@dataclass
class LoRAConfig:
    rank: int = opt(16, "LoRA rank r: the width of the low-rank update", min=1, max=1024)
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha / rank", min=0, min_open=True, max=4096)
    dropout: float = opt(0.05, "Dropout on the LoRA input during training", min=0, max=1, max_open=True)
    target_modules: list[str] = opt(["q_proj", "v_proj"], "Linear layers that get adapters, by name")
    num_layers: int = opt(-1, "How many transformer blocks (from the last) get adapters; -1 = all",
                          min=-1, max=1024)
    use_dora: bool = opt(False, "Use DoRA (weight-decomposed LoRA) instead of plain LoRA")


@dataclass
class TrainingConfig:
    epochs: int = opt(1, "Passes over the training set (ignored when iterations > 0)", min=0, max=10000)
    iterations: int = opt(0, "Optimizer steps to run; 0 = derive from epochs", min=0, max=10_000_000)
    batch_size: int = opt(2, "Conversations per micro-batch", min=1, max=4096)
    grad_accumulation: int = opt(4, "Micro-batches per optimizer step (effective batch = batch x this)",
                                 min=1, max=4096)
    learning_rate: float = opt(1e-4, "Peak learning rate of AdamW", min=0, max=1, min_open=True)
    lr_schedule: str = opt("cosine", "Decay after warmup", choices=["cosine", "linear", "constant"])
    warmup_steps: int = opt(10, "Linear warmup from 0 to the peak learning rate, in optimizer steps",
                            min=0, max=10_000_000)
    min_lr_ratio: float = opt(0.0, "Final learning rate as a fraction of the peak", min=0, max=1)
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay", min=0, max=1)
    adam_bias_correction: bool = opt(True, "AdamW's bias correction of its moment estimates, as in PyTorch and "
                                     "Hugging Face (the learning rates recipes give assume it); off = MLX's "
                                     "default, whose first steps are several times larger")
    max_grad_norm: float = opt(1.0, "Clip gradients to this global norm; 0 = no clipping", min=0, max=1e6)
    grad_checkpoint: bool = opt(False, "Recompute activations in the backward pass: less memory, ~30% slower")
    memory_limit_gb: float = opt(0.0, "GPU only: above this much memory MLX waits for queued work to free its "
                                 "buffers before queuing more (slower, never fails); 0 = the step's memory "
                                 "estimate + 15%", min=0, max=1e6)
    seed: int = opt(42, "Seed for the split, data order, dropout and adapter init", min=0, max=2**31 - 1)


@dataclass
class DataConfig:
    path: str = opt("data/tool_calls.jsonl", "Training data: a JSONL file of conversations")
    validation_split: float = opt(0.2, "Share of conversations held out for validation", min=0, max=1,
                                  max_open=True)
    shuffle: bool = opt(True, "Shuffle the training order every epoch")
    stratify: bool = opt(True, "Keep the label mix the same in the train and validation splits")
    train_labels: list[str] = opt(["desirable"], "Labels to train on; [] = all rows. Plain SFT on "
                                  "undesirable rows teaches the bad behaviour")
    mask_prompt: bool = opt(True, "Train only on assistant tokens (system, user and tool turns are masked)")
    error_threshold: float = opt(0.05, "Fail validation when more than this share of lines is bad",
                                 min=0, max=1)


@dataclass
class CheckpointConfig:
    every_steps: int = opt(100, "Save a checkpoint every N optimizer steps; 0 = only at the end",
                           min=0, max=10_000_000)
    keep_last: int = opt(3, "Keep the newest K checkpoints", min=1, max=1000)
    keep_best: bool = opt(True, "Also keep the checkpoint with the lowest validation loss")


@dataclass
class EvaluationConfig:
    every_steps: int = opt(50, "Validate every N optimizer steps; 0 = only at the end", min=0, max=10_000_000)
    val_batches: int = opt(25, "Validation batches per evaluation; -1 = the whole split", min=-1, max=1_000_000)
    heldout_path: str = opt("data/heldout.jsonl", "Held-out prompts with expected tool calls "
                            "(behaviour metric); empty = none")
    sample_prompts: list[str] = opt(["What's the weather like in Lisbon right now?",
                                     "Convert 250 US dollars to euros."],
                                    "Prompts answered by base and adapter at the end of a run")
    max_tokens: int = opt(128, "Most new tokens per generated answer", min=1, max=32768)
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy", min=0, max=5)
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest token set with this probability mass",
                       min=0, max=1, min_open=True)


@dataclass
class OutputConfig:
    dir: str = opt("runs", "Each run writes checkpoints, adapters, logs, metrics.jsonl and its report "
                   "under <dir>/<run_name>")
    run_name: str = opt("", "Folder name of this run; empty = a timestamp")
    log_every_steps: int = opt(1, "Report training loss every N optimizer steps", min=1, max=100000)
    log_level: str = opt("INFO", "Detail of the human-readable log", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else get_type_hints(Config)[f.name]
                             for f in dataclasses.fields(Config)}
SECTION_HELP = {
    "model": "Base model", "lora": "LoRA adapters", "training": "Optimizer and schedule",
    "data": "Dataset", "checkpoints": "Checkpoints", "evaluation": "Validation and sample generations",
    "output": "Output folders and logging",
}


@dataclass(frozen=True)
class FieldSpec:
    section: str
    name: str
    type: Any  # int, float, bool, str or list[str]
    default: Any
    help: str
    min: float | None
    max: float | None
    min_open: bool
    max_open: bool
    choices: list[str] | None

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.min is None and self.max is None:
            return ""
        lo = "" if self.min is None else f"{_num(self.min)} {'<' if self.min_open else '<='} "
        hi = "" if self.max is None else f" {'<' if self.max_open else '<='} {_num(self.max)}"
        return f"{lo}x{hi}"


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def _show(value: Any) -> str:
    """A value as an error message shows it: short, even for a 10 MB string or a YAML alias bomb."""
    return _SHORT.repr(value)


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def field_specs() -> list[FieldSpec]:
    specs = []
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            specs.append(FieldSpec(section, f.name, hints[f.name], default, m["help"], m["min"], m["max"],
                                   m["min_open"], m["max_open"], m["choices"]))
    return specs


SPECS: dict[str, FieldSpec] = {s.path: s for s in field_specs()}


@dataclass(frozen=True)
class ConfigIssue:
    field: str  # "training.learning_rate", or "" for the file as a whole
    message: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.severity}: {where}{self.message}"


class ConfigError(ValueError):
    """Raised with every problem at once; `issues` keeps them tied to their fields."""

    def __init__(self, issues: list[ConfigIssue], source: str = ""):
        self.issues = issues
        self.source = source
        errors = [i for i in issues if i.severity == "error"]
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(i.field + ": " + i.message if i.field else i.message)
                                          for i in errors))


# ---------------------------------------------------------------- coercion and validation

def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        t, "a list of strings")


def coerce(spec: FieldSpec, value: Any) -> tuple[Any, str | None]:
    """Turn a YAML/form value into the field's type, or say why it cannot be."""
    t = spec.type
    if t is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1"), None
        return None, f"expected true or false, got {_show(value)}"
    if t is int:
        if isinstance(value, bool):
            return None, f"expected an integer, got {_show(value)}"
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value), None
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", "")), None
            except ValueError:
                pass
        return None, f"expected an integer, got {_show(value)}"
    if t is float:
        if isinstance(value, bool):
            return None, f"expected a number, got {_show(value)}"
        if isinstance(value, (int, float)):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                return None, f"expected a number, got {_show(value)}"
        else:
            return None, f"expected a number, got {_show(value)}"
        if not math.isfinite(v):
            return None, f"must be a finite number, got {_show(value)}"
        return v, None
    if t is str:
        if value is None:
            return "", None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value), None
        return None, f"expected a string, got {_show(value)}"
    # list[str]
    if value is None:
        return [], None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value), None
    return None, f"expected a list of strings, got {_show(value)}"


def check_range(spec: FieldSpec, value: Any) -> str | None:
    if spec.choices is not None and value not in spec.choices:
        close = difflib.get_close_matches(str(value), spec.choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{_show(value)} is not {spec.range_text()}{hint}"
    if spec.type in (int, float):
        lo_bad = spec.min is not None and (value <= spec.min if spec.min_open else value < spec.min)
        hi_bad = spec.max is not None and (value >= spec.max if spec.max_open else value > spec.max)
        if lo_bad or hi_bad:
            return f"{_num(value)} is out of range (valid: {spec.range_text()})"
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
    if not cfg.data.path.strip():
        err("data.path", "empty: name a JSONL file")
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
    if cfg.model.trust_remote_code:
        warn("model.trust_remote_code", "on: the model directory may run arbitrary Python code")
    if ck.every_steps and ev.every_steps and ck.keep_best and ck.every_steps % ev.every_steps:
        warn("checkpoints.every_steps", f"{ck.every_steps} is not a multiple of evaluation.every_steps "
             f"({ev.every_steps}): the best checkpoint is judged on stale validation losses")
    return out


def run_name_problem(name: str) -> str | None:
    """The run folder must stay inside output.dir: no path separators, no parent folder; and be a name a
    user can see and type again: not only spaces, no control characters (a newline, a tab)."""
    if not name:
        return None  # a timestamp
    if name.strip() in (".", "..") or any(c in name for c in "/\\\0") or len(name) > 128:
        return f"{_show(name)} is not a plain folder name (no / or \\, not . or .., at most 128 characters)"
    if not name.strip():
        return f"{_show(name)} is only spaces: name the run, or leave it empty for a timestamp"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"{_show(name)} holds control characters (a newline or tab?): use a plain folder name"
    if name != name.strip():
        return f"{_show(name)} starts or ends with a space: write {name.strip()!r}"
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


# ---------------------------------------------------------------- building from dicts

def from_dict(data: Any, source: str = "") -> tuple[Config, list[ConfigIssue]]:
    """Build a Config from nested plain data; unknown keys and bad types become issues, not exceptions."""
    cfg = Config()
    issues: list[ConfigIssue] = []
    if data is None:
        return cfg, issues
    if not isinstance(data, dict):
        return cfg, [ConfigIssue("", f"the top level must be a mapping of sections, got {type(data).__name__}")]
    for section, values in data.items():
        if section not in SECTIONS:
            issues.append(ConfigIssue(str(section), _unknown(str(section), list(SECTIONS), "section")))
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            issues.append(ConfigIssue(section, f"must be a mapping of keys, got {_show(values)}"))
            continue
        for key, value in values.items():
            path = f"{section}.{key}"
            spec = SPECS.get(path)
            if spec is None:
                issues.append(ConfigIssue(path, _unknown(str(key), [s.name for s in SPECS.values()
                                                                  if s.section == section], "key", section)))
                continue
            coerced, err = coerce(spec, value)
            if err:
                issues.append(ConfigIssue(path, err))
                continue
            setattr(getattr(cfg, section), key, coerced)
    return cfg, issues


def _unknown(name: str, valid: list[str], what: str, section: str = "") -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if not close:  # a key put in the wrong section is a common slip
        elsewhere = [p for p in SPECS if p.endswith("." + name)]
        if elsewhere:
            return f"unknown {what} {name!r}; did you mean {elsewhere[0]!r}?"
    hint = f"; did you mean {(section + '.' if section else '') + close[0]!r}?" if close else \
        f"; valid: {', '.join(valid)}"
    return f"unknown {what} {name!r}{hint}"


def apply_env(cfg: Config, environ: dict | None = None) -> list[ConfigIssue]:
    """Apply LORA_TUI__SECTION__KEY=value overrides (values parsed as YAML scalars)."""
    issues = []
    env = os.environ if environ is None else environ
    for var, raw in sorted(env.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        parts = var[len(ENV_PREFIX):].lower().split("__")
        path = ".".join(parts)
        spec = SPECS.get(path)
        if len(parts) != 2 or spec is None:
            valid = [p.upper().replace(".", "__") for p in SPECS]
            close = difflib.get_close_matches(var[len(ENV_PREFIX):].upper(), valid, n=1)
            hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
            issues.append(ConfigIssue(path, f"environment variable {var} names no config key{hint}"))
            continue
        try:
            value = yaml.safe_load(raw) if spec.type is not str else raw
        except yaml.YAMLError:
            value = raw
        coerced, err = coerce(spec, value)
        if err:
            issues.append(ConfigIssue(path, f"from {var}: {err}"))
        else:
            setattr(getattr(cfg, spec.section), spec.name, coerced)
    return issues


# ---------------------------------------------------------------- YAML files

class _NoAliasLoader(yaml.SafeLoader):
    """Safe loading, and no anchors/aliases: a config never needs them and they enable 'billion laughs'."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a config",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([ConfigIssue("", f"{where}: invalid YAML: {problem}")], source) from None


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str | os.PathLike | None = None, *, environ: dict | None = None,
                strict: bool = True) -> tuple[Config, list[ConfigIssue]]:
    """Load a YAML config (missing keys take defaults), apply env overrides, validate.

    With strict=True any error raises ConfigError listing all of them; warnings are returned.
    """
    source = str(path) if path is not None else "<defaults>"
    data: Any = None
    if path is not None:
        p = Path(path)
        try:
            if p.is_dir():
                raise ConfigError([ConfigIssue("", f"{p} is a directory, not a YAML file")], source)
            if not stat.S_ISREG(p.stat().st_mode):  # a FIFO or device would block or never end
                raise ConfigError([ConfigIssue("", f"{p} is not a regular file")], source)
            if p.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError([ConfigIssue("", f"{p} is larger than 1 MiB: not a config file")], source)
            text = p.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError([ConfigIssue("", f"config file {p} does not exist")], source) from None
        except UnicodeDecodeError:
            raise ConfigError([ConfigIssue("", f"{p} is not UTF-8 text")], source) from None
        except OSError as exc:
            raise ConfigError([ConfigIssue("", f"cannot read {p}: {exc.strerror or exc}")], source) from None
        data = parse_yaml(text, source)
    cfg, issues = from_dict(data, source)
    issues += apply_env(cfg, environ)
    issues += validate(cfg)  # fields that failed to parse kept defaults, so nothing is reported twice
    if strict and any(i.severity == "error" for i in issues):
        raise ConfigError(issues, source)
    return cfg, issues


def to_yaml(cfg: Config, comments: bool = True) -> str:
    """YAML text of a config, with each key's help as a comment (the format of config.yaml)."""
    lines = ["# lora-tui configuration. Every key is optional; missing keys take these defaults.",
             f"# Override any key from the environment: {ENV_PREFIX}SECTION__KEY=value", ""]
    data = cfg.to_dict()
    for section, values in data.items():
        if comments:
            lines.append(f"# {SECTION_HELP[section]}")
        lines.append(f"{section}:")
        for key, value in values.items():
            spec = SPECS[f"{section}.{key}"]
            dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=1 << 16,
                                    allow_unicode=True).strip()[1:-1].strip()
            if comments:
                rng = spec.range_text()
                lines.append(f"  # {spec.help}" + (f" ({rng})" if rng else ""))
            lines.append(f"  {dumped}")
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic.write_text(path, to_yaml(cfg))


def set_value(cfg: Config, path: str, value: Any) -> ConfigIssue | None:
    """Set one field from a form's raw value; returns the issue instead when it is invalid."""
    spec = SPECS.get(path)
    if spec is None:
        return ConfigIssue(path, _unknown(path, list(SPECS), "key"))
    coerced, err = coerce(spec, value)
    if err is None:
        err = check_range(spec, coerced)
    if err:
        return ConfigIssue(path, err)
    setattr(getattr(cfg, spec.section), spec.name, coerced)
    return None
