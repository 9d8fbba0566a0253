"""Streaming validation of any container engine.data.sources reads: every bad row with its line (text
files) or index (tables), field and reason, plus statistics.

Rows arrive one at a time in bounded memory (a JSONL line over MAX_LINE_BYTES is skipped, not loaded), so a
100k-row file validates and tokenizes without holding it. `keep_examples=True` also returns the encoded
conversations, for training.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from engine.data.encode import ChatEncoder, Encoded, truncate
from engine.data.pairs import encode_rows, parse_record, rejected_fit
from engine.data.records import Conversation, LineIssue
from engine.data.shapes import drop_nulls, from_alpaca, is_alpaca, rename_columns
from engine.data.sources import RowSource, open_source
from engine.data.sources.state import BLANK, DatasetError
from engine.data.sources.text import MAX_LINE_BYTES, decode_cells, iter_lines  # noqa: F401 - old home of two
from engine.data.template import EncodeError, TemplateLimitError

MAX_KEPT_ISSUES = 2000  # the report keeps the first N issues; counts stay exact
CHUNK = 256  # rows tokenized together
COLUMN_SAMPLE = 100  # rows whose field names are kept, to tell a data.columns entry that matches nothing


@dataclass
class Example:
    line: int
    label: str | None
    encoded: Encoded  # already truncated to max_seq_length (a pair row: prompt + chosen)
    rejected: Encoded | None = None  # a pair row: prompt + rejected
    source: int = 0  # which of data.path's sources it came from


@dataclass
class DatasetReport:
    path: str
    shape: str = "JSONL"  # the container read: JSONL, JSON array, CSV, TSV, Parquet, Arrow, ...
    unit: str = "line"  # what issues are numbered by: line (text files) or row (tables, from 0)
    columns: dict = field(default_factory=dict)  # the data.columns map applied ({our field: their column})
    rows: int = 0  # rows read, blank lines included
    lines: int = 0  # the last line read (text files)
    blank_lines: int = 0
    valid: int = 0
    error_lines: int = 0
    issues: list[LineIssue] = field(default_factory=list)
    issue_count: int = 0
    formats: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    pairs: int = 0  # valid pair rows (chosen / rejected), for DPO and ORPO
    trainable: int = 0  # valid rows whose label is among train_labels
    set_aside: Counter = field(default_factory=Counter)  # valid rows left out by label
    lengths: list[int] = field(default_factory=list)  # tokens per valid conversation (if tokenized)
    trained_tokens: int = 0
    truncated: int = 0
    max_seq_length: int = 0
    error_threshold: float = 0.05
    seconds: float = 0.0
    stopped: bool = False  # the read ended early on a stop request
    unread: str = ""  # the reader could not go past a broken record: why (the rest is unread)
    parts: list = field(default_factory=list)  # a mix of sources (engine.data.mixture): each one's report
    mix: list[str] = field(default_factory=list)  # a mix: each source's share, one line each
    warnings: list[str] = field(default_factory=list)
    template_notes: Counter = field(default_factory=Counter)  # note -> conversations affected

    @property
    def records(self) -> int:
        return self.rows - self.blank_lines

    @property
    def error_rate(self) -> float:
        return self.error_lines / self.records if self.records else 0.0

    @property
    def failed(self) -> bool:
        return (self.records == 0 or self.valid == 0 or self.error_rate > self.error_threshold or bool(self.unread)
                or any(p.failed for p in self.parts))

    def length_percentiles(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        arr = np.asarray(self.lengths)
        return {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 95, 99)} | {
            "min": int(arr.min()), "max": int(arr.max()), "mean": int(arr.mean())}

    def histogram(self, bins: int = 20) -> tuple[list[int], list[int]]:
        """(counts, bin edges) of token lengths, for the TUI's histogram."""
        if not self.lengths:
            return [], []
        counts, edges = np.histogram(np.asarray(self.lengths), bins=bins)
        return counts.tolist(), [int(e) for e in edges]

    def summary(self) -> str:
        parts = [f"{self.path}: {self.valid} of {self.records} conversations valid"]
        if self.error_lines:
            parts.append(f"{self.error_lines} bad lines ({self.error_rate:.1%}, threshold "
                         f"{self.error_threshold:.0%})")
        if self.labels:
            parts.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items())))
        if self.set_aside:
            parts.append(f"{sum(self.set_aside.values())} set aside by label ("
                         + ", ".join(f"{k}={v}" for k, v in sorted(self.set_aside.items())) + ")")
        if self.lengths:
            p = self.length_percentiles()
            parts.append(f"tokens p50={p['p50']} p95={p['p95']} max={p['max']}; {self.truncated} longer than "
                         f"{self.max_seq_length} will be truncated")
        return "; ".join(parts)

    def shape_lines(self) -> list[str]:
        """What was read and how: each source's container and row shapes, the column map, the mix."""
        lines = [f"{p.path}: {p.shape}; rows: " + (", ".join(f"{k} {v}" for k, v in sorted(p.formats.items()))
                                                 or "none") for p in self.parts or [self]]
        if self.columns:
            lines.append("data.columns: " + ", ".join(f"{ours} <- {theirs!r}" for ours, theirs in self.columns.items()))
        return lines + [f"mix: {line}" for line in self.mix]

    def to_dict(self) -> dict:
        return {
            "path": self.path, "shape": self.shape, "unit": self.unit, "columns": dict(self.columns),
            "lines": self.lines, "unread": self.unread, "mix": list(self.mix),
            "sources": [p.to_dict() for p in self.parts], "records": self.records, "valid": self.valid,
            "error_lines": self.error_lines, "error_rate": round(self.error_rate, 6),
            "issues": self.issue_count, "formats": dict(self.formats), "labels": dict(self.labels),
            "trainable": self.trainable, "set_aside": dict(self.set_aside),
            "length_percentiles": self.length_percentiles(), "trained_tokens": self.trained_tokens,
            "truncated": self.truncated, "max_seq_length": self.max_seq_length,
            "warnings": list(self.warnings), "template_notes": dict(self.template_notes), "failed": self.failed,
        }


def validate_dataset(
    path: str | os.PathLike | RowSource,
    tokenizer=None,
    *,
    columns: dict[str, str] | None = None,
    max_seq_length: int = 1024,
    error_threshold: float = 0.05,
    train_labels: list[str] | None = None,
    mask_prompt: bool = True,
    keep_examples: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[DatasetReport, list[Example]]:
    """Validate (and, with a tokenizer, tokenize) a dataset in any container engine.data.sources reads.
    Never raises for bad rows; raises DatasetError when the source cannot be read at all."""
    source = path if isinstance(path, RowSource) else open_source(path)
    columns = dict(columns or {})
    p = str(source.file) if source.file else source.path
    report = DatasetReport(p, source.shape, source.unit, columns, max_seq_length=max_seq_length,
                           error_threshold=error_threshold)
    try:
        encoder = ChatEncoder(tokenizer, mask_prompt) if tokenizer is not None else None
    except EncodeError as exc:  # the template does not compile: no line can be rendered
        raise DatasetError(f"{p}: {exc}") from None
    before = source.fingerprint()
    wanted = set(train_labels or [])
    examples: list[Example] = []
    seen_fields: set[str] = set()
    start = time.perf_counter()

    def add_issue(issue: LineIssue) -> None:
        report.issue_count += 1
        if len(report.issues) < MAX_KEPT_ISSUES:
            report.issues.append(issue if issue.unit == source.unit else replace(issue, unit=source.unit))

    def finish(number: int, conv: Conversation | None, issues: list[LineIssue]) -> None:
        if any(i.severity == "error" for i in issues):
            report.error_lines += 1
        for issue in issues:
            add_issue(issue)
        if conv is None or any(i.severity == "error" for i in issues):
            return
        report.valid += 1
        report.formats[conv.format] += 1
        label = conv.label or "unlabelled"
        if conv.rejected is not None:
            report.pairs += 1
        if conv.rejected is None or conv.label is not None:
            report.labels[label] += 1
        if not wanted or conv.label is None or conv.label in wanted:
            report.trainable += 1
        else:
            report.set_aside[label] += 1

    def flush(pending: list[tuple[int, Conversation | None, list[LineIssue]]]) -> None:
        if encoder is not None:
            ok = [(n, c) for n, c, iss in pending if c is not None]
            encoded = encode_rows(encoder, ok)
            for number, enc in encoded.items():
                for one in enc if isinstance(enc, tuple) else (enc,):
                    if isinstance(one, TemplateLimitError):  # the template's fault: every line would hit it
                        raise DatasetError(f"{p}: {source.unit} {number}: {one}")
        for number, conv, issues in pending:
            if conv is not None and encoder is not None:
                keep = keep_examples and (not wanted or conv.label is None or conv.label in wanted)
                issues = issues + _encode_issues(encoded[number], conv, number, max_seq_length, report,
                                                 examples, keep)
            finish(number, conv, issues)
        pending.clear()

    pending: list[tuple[int, Conversation | None, list[LineIssue]]] = []
    rows = source.rows()
    state = source.state
    for number, record, error in rows:
        report.rows += 1
        report.lines = number
        if error:
            pending.append((number, None, [LineIssue(number, *error)]))
        elif record is BLANK:
            report.blank_lines += 1
        else:
            if report.rows <= COLUMN_SAMPLE and isinstance(record, dict):
                seen_fields.update(map(str, record))
            pending.append((number, *_parse(record, number, columns, source.arrow, source.cells)))
        if len(pending) >= CHUNK:
            flush(pending)
            if progress and state.total:
                progress(min(state.done, state.total), state.total)
            if should_stop and should_stop():
                report.warnings.append(f"stopped early at {source.unit} {number}")
                report.stopped = True
                break
    flush(pending)
    if state.ended:
        report.unread = f"{source.unit} {report.lines}: {state.ended}"
        report.warnings.append(f"the read stopped at {report.unread}; the rest is unread: fix the file there")
    if before is not None and source.fingerprint() != before:
        report.warnings.append("the file changed while it was being validated (its size or modification time "
                               "differs): the report may mix old and new lines; validate it again once it "
                               "is written")
    for ours, theirs in columns.items():
        if seen_fields and theirs not in seen_fields and ours not in seen_fields:
            report.warnings.append(f"data.columns maps {ours} to {theirs!r}, but no row has a {theirs!r} field "
                                   f"(fields found: {', '.join(sorted(seen_fields)[:8])})")
    report.seconds = time.perf_counter() - start
    if progress and not report.stopped:  # a stopped read is not done: no 100% for it
        progress(1, 1)
    if report.records == 0:
        report.warnings.append("the file has no records")
    for note, count in report.template_notes.items():
        report.warnings.append(f"{count} conversations: {note}")
    return report, examples


def first_conversations(path, columns: dict[str, str] | None = None, limit: int = 200,
                        stopped: Callable[[], bool] = lambda: False):
    """(number, unit, Conversation) of the valid rows among the first `limit`, read as validation reads
    them (a JSONL line over its size limit is skipped, never loaded): the dataset screen's preview."""
    source = path if isinstance(path, RowSource) else open_source(path)
    for number, record, error in source.rows():
        if number >= limit or stopped():
            return
        if error is None and record is not BLANK:
            conv, issues = _parse(record, number, dict(columns or {}), source.arrow, source.cells)
            if conv is not None:
                yield number, source.unit, conv


def _parse(record, number: int, columns: dict[str, str], arrow: bool,
           cells: bool) -> tuple[Conversation | None, list[LineIssue]]:
    """A decoded row through the column map and the Alpaca shape into the record parser; issues name the
    user's own columns."""
    if arrow and isinstance(record, dict):  # a table fills a row's absent fields with null
        record = drop_nulls(record)
    record = rename_columns(record, columns)
    if cells and isinstance(record, dict):  # CSV cells and table strings may hold JSON (after the rename)
        record, error = decode_cells(record)
        if error:
            return None, [_renamed_issue(LineIssue(number, *error), columns)]
    if is_alpaca(record):
        converted, issues = from_alpaca(record, number)
        conv, more = parse_record(converted, number) if converted is not None else (None, [])
        if conv is not None and conv.rejected is None:
            conv.format = "alpaca"
        issues += more
    else:
        conv, issues = parse_record(record, number)
    return conv, [_renamed_issue(i, columns) for i in issues] if columns else issues


def _renamed_issue(issue: LineIssue, columns: dict[str, str]) -> LineIssue:
    return replace(issue, field=_renamed(issue.field, columns)) if columns else issue


def _renamed(where: str, theirs: dict[str, str]) -> str:
    head, sep, rest = where.partition(".")
    bracket = head.find("[")
    key, tail = (head, "") if bracket < 0 else (head[:bracket], head[bracket:])
    return f"{theirs[key]}{tail}{sep}{rest}" if key in theirs else where


def _encode_issues(enc, conv: Conversation, number: int, max_len: int, report: DatasetReport,
                   examples: list[Example], keep: bool) -> list[LineIssue]:
    if isinstance(enc, tuple):  # a pair row: both answers must encode; lengths count the chosen one
        chosen, rejected = enc
        for key, one in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(one, EncodeError):
                return [LineIssue(number, key, str(one))]
        rejected_issues = rejected_fit(rejected, number, max_len)
        if rejected_issues and rejected_issues[0].severity == "error":
            return rejected_issues
        kept: list[Example] = []
        issues = _encode_issues(chosen, conv, number, max_len, report, kept, keep)
        if kept:
            examples.append(Example(number, conv.label, kept[0].encoded, truncate(rejected, max_len)))
        return issues + rejected_issues
    if isinstance(enc, EncodeError):
        return [LineIssue(number, "conversations" if conv.format == "seed" else "messages", str(enc))]
    issues = []
    full_length = len(enc)
    if enc.n_trained == 0:
        return [LineIssue(number, "", "no trained tokens after templating")]
    if len(enc) > max_len:
        cut = truncate(enc, max_len)
        if cut.n_trained == 0:
            return [LineIssue(number, "", f"too long: {len(enc)} tokens, and truncating to max_seq_length="
                              f"{max_len} removes every assistant token")]
        issues.append(LineIssue(number, "", f"{len(enc)} tokens: truncated to max_seq_length={max_len}",
                                "warning"))
        report.truncated += 1
        enc = cut
    report.lengths.append(full_length)  # before truncation, so the histogram shows what is cut
    report.trained_tokens += enc.n_trained
    report.template_notes.update(enc.notes)
    if keep:
        examples.append(Example(number, conv.label, enc))
    return issues

