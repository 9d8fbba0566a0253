"""Dataset pipeline: parse and validate JSONL, render through the chat template with loss masks, split."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config.schema import Config
from engine.data.encode import ChatEncoder, Encoded
from engine.data.methods import for_method, method_use
from engine.data.pairs import parse_record
from engine.data.records import Conversation, LineIssue
from engine.data.split import stratified_split
from engine.data.validate import DatasetError, DatasetReport, Example, validate_dataset

__all__ = ["ChatEncoder", "Conversation", "DatasetError", "DatasetReport", "Encoded", "Example",
           "LineIssue", "PreparedData", "method_use", "parse_record", "prepare_dataset", "stratified_split",
           "validate_dataset", "validate_with_config"]


@dataclass
class PreparedData:
    report: DatasetReport
    train: list[Example]
    valid: list[Example]


def validate_with_config(cfg: Config, tokenizer, path: str | None = None, **kwargs):
    """validate_dataset with the config's length limit, threshold, labels (SFT's; the preference methods
    keep every row, engine.data.methods picks theirs) and masking."""
    d = cfg.data
    labels = d.train_labels if cfg.training.method == "sft" else []
    return validate_dataset(path or d.path, tokenizer, max_seq_length=cfg.model.max_seq_length,
                            error_threshold=d.error_threshold, train_labels=labels,
                            mask_prompt=d.mask_prompt, **kwargs)


def prepare_dataset(cfg: Config, tokenizer, path: str | None = None, progress=None,
                    should_stop=None) -> PreparedData:
    """Validate, tokenize, filter by label and split; raise DatasetError when it is unusable."""
    d = cfg.data
    report, examples = validate_with_config(cfg, tokenizer, path, keep_examples=True, progress=progress,
                                            should_stop=should_stop)
    if report.failed:
        first = "; ".join(str(i) for i in report.issues[:3] if i.severity == "error")
        if report.records == 0:
            raise DatasetError(f"{report.path}: empty file: no conversations")
        if report.valid == 0:
            raise DatasetError(f"{report.path}: no valid conversations ({report.error_lines} bad lines; "
                               f"first: {first})")
        raise DatasetError(f"{report.path}: {report.error_lines} of {report.records} lines are bad "
                           f"({report.error_rate:.1%} > error_threshold {d.error_threshold:.0%}); first: {first}")
    if not examples:
        raise DatasetError(f"{report.path}: no conversation has a label in data.train_labels "
                           f"{d.train_labels} (labels found: {dict(report.labels)})")
    train, valid = stratified_split(examples, [e.label for e in examples], d.validation_split,
                                    cfg.training.seed, d.stratify)
    train, valid = for_method(cfg.training.method, train, valid, report, report.warnings.append)
    batch = cfg.training.batch_size
    if valid and len(valid) < batch:
        report.warnings.append(f"the validation split has {len(valid)} conversations, fewer than "
                               f"batch_size={batch}: validation uses smaller batches")
    if len(train) < batch:
        raise DatasetError(f"{report.path}: only {len(train)} training conversations, fewer than "
                           f"training.batch_size={batch}")
    return PreparedData(report, train, valid)
