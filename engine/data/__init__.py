"""Dataset pipeline: read any container (engine.data.sources), parse and validate its rows, render them through
the chat template with loss masks, split, and mix several sources by weight."""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.config.schema import Config
from engine.data.encode import ChatEncoder, Encoded
from engine.data.methods import for_method, method_use
from engine.data.mixture import merge_reports, mix, source_specs
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


def validate_with_config(cfg: Config, tokenizer, path=None, **kwargs) -> tuple[DatasetReport, list[Example]]:
    """validate_dataset with the config's column map, length limit, threshold, labels (SFT's; the preference
    methods keep every row, engine.data.methods picks theirs) and masking; each of several sources on its
    own (examples tagged with their source), then one merged report."""
    d = cfg.data
    labels = d.train_labels if cfg.training.method == "sft" else []
    specs = source_specs(d.path if path is None else path)
    reports, examples = [], []
    for i, spec in enumerate(specs):
        report, found = validate_dataset(spec.path, tokenizer, columns=d.columns,
                                         max_seq_length=cfg.model.max_seq_length, error_threshold=d.error_threshold,
                                         train_labels=labels, mask_prompt=d.mask_prompt, **kwargs)
        reports.append(report)
        examples += [replace(e, source=i) for e in found] if i else found
        if report.stopped:
            break
    if len(reports) == 1:
        return reports[0], examples
    return merge_reports(reports, [s.weight for s in specs[:len(reports)]]), examples


def prepare_dataset(cfg: Config, tokenizer, path: str | None = None, progress=None,
                    should_stop=None) -> PreparedData:
    """Validate, tokenize, filter by label and split; raise DatasetError when it is unusable."""
    d = cfg.data
    report, examples = validate_with_config(cfg, tokenizer, path, keep_examples=True, progress=progress,
                                            should_stop=should_stop)
    for part in report.parts:  # a mix: each source must pass on its own
        if part.failed:
            _refuse(part, d.error_threshold)
    _refuse(report, d.error_threshold)
    if not examples:
        raise DatasetError(f"{report.path}: no conversation has a label in data.train_labels "
                           f"{d.train_labels} (labels found: {dict(report.labels)})")
    seed = cfg.training.seed
    weights = [s.weight for s in source_specs(d.path if path is None else path)]
    train, valid = [], []
    for i in range(len(weights)):  # each source split on its own: its validation rows are its own
        group = [e for e in examples if e.source == i]
        t, v = stratified_split(group, [e.label for e in group], d.validation_split, seed, d.stratify)
        train.append(t)
        valid += v
    train = mix(train, weights, seed) if len(weights) > 1 else train[0]
    train, valid = for_method(cfg.training.method, train, valid, report, report.warnings.append)
    batch = cfg.training.batch_size
    if valid and len(valid) < batch:
        report.warnings.append(f"the validation split has {len(valid)} conversations, fewer than "
                               f"batch_size={batch}: validation uses smaller batches")
    if len(train) < batch:
        raise DatasetError(f"{report.path}: only {len(train)} training conversations, fewer than "
                           f"training.batch_size={batch}")
    return PreparedData(report, train, valid)


def _refuse(report: DatasetReport, threshold: float) -> None:
    """DatasetError with the first problems when the report fails."""
    if report.failed and not report.parts:
        first = "; ".join(str(i) for i in report.issues[:3] if i.severity == "error")
        if report.unread:
            raise DatasetError(f"{report.path}: the read stopped at {report.unread}; fix the file there (the rest "
                               "was not read)")
        if report.records == 0:
            raise DatasetError(f"{report.path}: empty file: no conversations")
        unit = report.unit + "s"
        if report.valid == 0:
            raise DatasetError(f"{report.path}: no valid conversations ({report.error_lines} bad {unit}; "
                               f"first: {first})")
        raise DatasetError(f"{report.path}: {report.error_lines} of {report.records} {unit} are bad "
                           f"({report.error_rate:.1%} > error_threshold {threshold:.0%}); first: {first}")
