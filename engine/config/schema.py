"""The settings: dataclasses per category, the field specs derived from them, and config issues.

Every field carries its help text and valid range in `field(metadata=...)`, so the same source feeds
validation, the TUI's forms, `config.yaml`'s comments and the README's reference table.
"""

from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass, field
from typing import Any, get_type_hints



def opt(default, help: str, *, min=None, max=None, min_open=False, max_open=False, choices=None, each=None):
    """A config field with its help text and valid range; `each`: the values a list field's items may take
    (kept apart from `choices`, which makes the form a single-choice select)."""
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "max_open": max_open,
            "choices": choices, "each": each}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# evaluation.metrics' names (engine/evaluate/metrics.py scores them).
HELDOUT_METRICS = ("exact", "contains", "regex", "json", "rouge_l", "chrf", "tool_call")


@dataclass
class ModelConfig:
    name: str = opt("embedded", "Base model: `embedded` (SmolLM2-135M-Instruct, 93 MB, in the clone's environment or fetched once), a local "
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
                                 "estimate; + 15% with grad_checkpoint and adapters on more than one input a "
                                 "block (e.g. all seven layers), with a quantized base, DoRA or on Metal",
                                 min=0, max=1e6)
    seed: int = opt(42, "Seed for the split, data order, dropout and adapter init", min=0, max=2**31 - 1)
    distributed_backend: str = opt("auto", "Several machines or GPUs (a run under mlx.launch): how ranks sum "
                                   "gradients; auto = NCCL on CUDA GPUs, the ring (TCP) elsewhere",
                                   choices=["auto", "ring", "nccl", "mpi"])
    method: str = opt("sft", "What the run learns from: sft = the desirable (data.train_labels) rows' "
                      "answers; kto = desirable and undesirable rows (unpaired labels); dpo / orpo = pair rows "
                      "(chosen / rejected)", choices=["sft", "kto", "dpo", "orpo"])
    init_adapter: str = opt("", "Start from this adapter (an adapter, checkpoint or run folder), e.g. SFT first, "
                            "then KTO on top; for kto/dpo it is also the reference policy; empty = fresh adapters")
    beta: float = opt(0.1, "KTO/DPO: how far the policy may move from the reference (higher = stays closer); "
                      "ORPO: the weight of its odds-ratio term (TRL's beta)", min=0, max=100, min_open=True)
    desirable_weight: float = opt(1.0, "KTO: weight of the desirable rows' loss (the paper's lambda_D)",
                                  min=0, max=100, min_open=True)
    undesirable_weight: float = opt(0.0, "KTO: weight of the undesirable rows' loss (lambda_U); 0 = auto, "
                                    "balancing the classes: desirable_weight x desirable rows / undesirable rows",
                                    min=0, max=100)


@dataclass
class DataConfig:
    path: str | list = opt("data/tool_calls.jsonl", "Training data: a file (JSONL, JSON, CSV/TSV, Parquet, Arrow), "
                           "a `datasets` folder or a hub id (owner/name); several mixed by weight as a list of "
                           "{path, weight} (in the form: a.jsonl*0.7, b.parquet*0.3)")
    columns: dict[str, str] = opt({}, "Your field names for ours, e.g. {prompt: question, completion: answer, "
                                  "label: rating} (in the form: prompt=question, completion=answer)")
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
    heldout_path: str = opt("data/heldout.jsonl", "Held-out items scored with evaluation.metrics, base against "
                            "tuned, by `train --eval-only` and at the end of a run: any file data.path reads; a row "
                            "is a prompt and its reference (the last assistant turn, the completion, the Alpaca "
                            "output, or a reference/expected field); empty = none")
    metrics: list[str] = opt(["tool_call"], "How each held-out answer is scored against its reference; chrf on "
                             "a 0-100 scale, the others 0-1; tool_call: the expected call, null = no tool",
                             each=list(HELDOUT_METRICS))
    heldout_limit: int = opt(100, "Score the first N held-out items; 0 = all", min=0, max=10_000_000)
    heldout_batch_size: int = opt(16, "Held-out prompts answered together (batched greedy decoding)",
                                  min=1, max=1024)
    regex: str = opt("", "Metric regex: the pattern every answer must match (re.search); empty = each item's "
                     "reference is its pattern")
    json_schema: str = opt("", "Metric json: a JSON Schema (a file, or inline JSON) answers must validate "
                           "against; empty = an item's own schema field, else the answer need only parse")
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


# The fields data.columns may map a file's own column names to (engine/data/shapes.py reads them).
COLUMN_FIELDS = ("messages", "conversations", "prompt", "completion", "text", "chosen", "rejected", "label",
                 "tools", "instruction", "input", "output", "system", "history")
SOURCES_TYPE = str | list  # data.path: one source, or a list of {path, weight}

SECTIONS: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else get_type_hints(Config)[f.name]
                             for f in dataclasses.fields(Config)}
SECTION_HELP = {
    "model": "Base model", "lora": "LoRA adapters", "training": "Optimizer and schedule",
    "data": "Dataset", "checkpoints": "Checkpoints",
    "evaluation": "Validation, held-out metrics and sample generations",
    "output": "Output folders and logging",
}


@dataclass(frozen=True)
class FieldSpec:
    section: str
    name: str
    type: Any  # int, float, bool, str, list[str], dict[str, str] or SOURCES_TYPE
    default: Any
    help: str
    min: float | None
    max: float | None
    min_open: bool
    max_open: bool
    choices: list[str] | None
    each: list[str] | None = None  # a list field: the values its items may take

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.each:
            return "each one of " + ", ".join(self.each)
        if self.min is None and self.max is None:
            return ""
        lo = "" if self.min is None else f"{show_number(self.min)} {'<' if self.min_open else '<='} "
        hi = "" if self.max is None else f" {'<' if self.max_open else '<='} {show_number(self.max)}"
        return f"{lo}x{hi}"


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def show_value(value: Any) -> str:
    """A value as an error message shows it: short, even for a 10 MB string or a YAML alias bomb."""
    return _SHORT.repr(value)


def show_number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def field_specs() -> list[FieldSpec]:
    specs = []
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            specs.append(FieldSpec(section, f.name, hints[f.name], default, m["help"], m["min"], m["max"],
                                   m["min_open"], m["max_open"], m["choices"], m["each"]))
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


