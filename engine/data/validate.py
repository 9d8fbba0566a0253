"""Streaming JSONL validation: every bad line with its number, field and reason, plus statistics.

Reads line by line in bounded memory (a line over MAX_LINE_BYTES is skipped, not loaded), so a 100k-line
file validates and tokenizes without holding it. `keep_examples=True` also returns the encoded
conversations, for training.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from engine.data.encode import ChatEncoder, Encoded, truncate
from engine.data.pairs import encode_rows, parse_record, rejected_fit
from engine.data.records import Conversation, LineIssue
from engine.data.template import EncodeError, TemplateLimitError

MAX_LINE_BYTES = 10 * 1024 * 1024
MAX_KEPT_ISSUES = 2000
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: paired (an emoji) or lone
CHUNK = 256  # lines tokenized together  # the report keeps the first N issues; counts stay exact


class DatasetError(ValueError):
    """The dataset cannot be used at all (missing file, not JSONL, over the error threshold)."""


@dataclass
class Example:
    line: int
    label: str | None
    encoded: Encoded  # already truncated to max_seq_length (a pair row: prompt + chosen)
    rejected: Encoded | None = None  # a pair row: prompt + rejected


@dataclass
class DatasetReport:
    path: str
    lines: int = 0
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
    warnings: list[str] = field(default_factory=list)
    template_notes: Counter = field(default_factory=Counter)  # note -> conversations affected

    @property
    def records(self) -> int:
        return self.lines - self.blank_lines

    @property
    def error_rate(self) -> float:
        return self.error_lines / self.records if self.records else 0.0

    @property
    def failed(self) -> bool:
        return self.records == 0 or self.valid == 0 or self.error_rate > self.error_threshold

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

    def to_dict(self) -> dict:
        return {
            "path": self.path, "lines": self.lines, "records": self.records, "valid": self.valid,
            "error_lines": self.error_lines, "error_rate": round(self.error_rate, 6),
            "issues": self.issue_count, "formats": dict(self.formats), "labels": dict(self.labels),
            "trainable": self.trainable, "set_aside": dict(self.set_aside),
            "length_percentiles": self.length_percentiles(), "trained_tokens": self.trained_tokens,
            "truncated": self.truncated, "max_seq_length": self.max_seq_length,
            "warnings": list(self.warnings), "template_notes": dict(self.template_notes), "failed": self.failed,
        }


def check_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    try:
        if not p.exists():
            if p.is_symlink():
                raise DatasetError(f"{p}: a symbolic link that leads nowhere (broken, or a loop)")
            raise DatasetError(f"{p}: no such file")
        if p.is_dir():
            raise DatasetError(f"{p}: is a directory, not a JSONL file")
        if not p.is_file():
            raise DatasetError(f"{p}: not a regular file")
    except OSError as exc:  # a symlink loop, a permission problem
        raise DatasetError(f"{p}: {exc.strerror or exc}") from None
    return p


def iter_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) per line; text is None when the line is unusable as text."""
    with open(path, "rb") as fh:
        number = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest without holding it
                    raw = fh.readline(1 << 20)
                yield number, None, f"line is longer than {MAX_LINE_BYTES // (1024 * 1024)} MB"
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark
            if b"\x00" in raw:
                yield number, None, "contains NUL bytes: binary data, not JSON text"
                continue
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as exc:
                yield number, None, f"invalid UTF-8 at byte {exc.start + 1} of the line"


def validate_dataset(
    path: str | os.PathLike,
    tokenizer=None,
    *,
    max_seq_length: int = 1024,
    error_threshold: float = 0.05,
    train_labels: list[str] | None = None,
    mask_prompt: bool = True,
    keep_examples: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[DatasetReport, list[Example]]:
    """Validate (and, with a tokenizer, tokenize) a JSONL file. Never raises for bad lines."""
    p = check_path(path)
    report = DatasetReport(str(p), max_seq_length=max_seq_length, error_threshold=error_threshold)
    try:
        encoder = ChatEncoder(tokenizer, mask_prompt) if tokenizer is not None else None
    except EncodeError as exc:  # the template does not compile: no line can be rendered
        raise DatasetError(f"{p}: {exc}") from None
    before = _fingerprint(p)
    wanted = set(train_labels or [])
    examples: list[Example] = []
    total_bytes = max(p.stat().st_size, 1)
    done_bytes = 0
    start = time.perf_counter()

    def add_issue(issue: LineIssue) -> None:
        report.issue_count += 1
        if len(report.issues) < MAX_KEPT_ISSUES:
            report.issues.append(issue)

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
                        raise DatasetError(f"{p}: line {number}: {one}")
        for number, conv, issues in pending:
            if conv is not None and encoder is not None:
                keep = keep_examples and (not wanted or conv.label is None or conv.label in wanted)
                issues = issues + _encode_issues(encoded[number], conv, number, max_seq_length, report,
                                                 examples, keep)
            finish(number, conv, issues)
        pending.clear()

    pending: list[tuple[int, Conversation | None, list[LineIssue]]] = []
    for number, text, error in iter_lines(p):
        report.lines = number
        done_bytes += len(text.encode("utf-8", "replace")) + 1 if text is not None else MAX_LINE_BYTES
        if error:
            pending.append((number, None, [LineIssue(number, "", error)]))
        elif not text.strip():
            report.blank_lines += 1
        else:
            pending.append((number, *_parse_line(text, number)))
        if len(pending) >= CHUNK:
            flush(pending)
            if progress:
                progress(min(done_bytes, total_bytes), total_bytes)
            if should_stop and should_stop():
                report.warnings.append(f"stopped early at line {number}")
                report.stopped = True
                break
    flush(pending)
    if _fingerprint(p) != before:
        report.warnings.append("the file changed while it was being validated (its size or modification time "
                               "differs): the report may mix old and new lines; validate it again once it "
                               "is written")
    report.seconds = time.perf_counter() - start
    if progress and not report.stopped:  # a stopped read is not done: no 100% for it
        progress(total_bytes, total_bytes)
    if report.records == 0:
        report.warnings.append("the file has no records")
    for note, count in report.template_notes.items():
        report.warnings.append(f"{count} conversations: {note}")
    return report, examples


def _fingerprint(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _parse_line(text: str, number: int) -> tuple[Conversation | None, list[LineIssue]]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [LineIssue(number, "", f"invalid JSON: {exc.msg} at column {exc.colno}")]
    except RecursionError:
        return None, [LineIssue(number, "", "invalid JSON: nested too deeply")]
    except ValueError as exc:  # an integer over Python's digit limit (4300)
        return None, [LineIssue(number, "", f"unreadable number ({str(exc).split(';')[0]}): write it as a "
                                "string")]
    if SURROGATE_ESCAPE.search(text) and (where := _surrogate_field(record)) is not None:
        return None, [LineIssue(number, where, "contains a lone surrogate escape (\\ud800-\\udfff without "
                                "its pair): not a character, cannot be encoded as UTF-8; fix or remove the escape")]
    return parse_record(record, number)


def _surrogate_field(record) -> str | None:
    try:
        return _lone_surrogate(record)
    except RecursionError:  # nested as deep as JSON allows: the tokenizer reports it, if need be
        return None


def _lone_surrogate(value, where: str = "") -> str | None:
    """Where in the record a string (or key) holds an unpaired UTF-16 surrogate that JSON let through."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str):
            if _lone_surrogate(key) is not None:
                return where or "(a key)"
            inner = f"{where}.{key}" if where else key
        else:
            inner = f"{where}[{key}]"
        if (found := _lone_surrogate(item, inner)) is not None:
            return found
    return None


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

