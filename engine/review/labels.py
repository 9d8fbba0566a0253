"""Labelled conversations appended to a dataset file in the seed's schema, one JSON line each:

  {"conversations": [{"role": ..., "content": ...}, ...], "label": "desirable" | "undesirable"}

Why an append and not a rewrite: a label is one line, and the lines before it are never touched again, so
no crash can corrupt them; a rewrite (engine.atomic.write_text) would copy the whole file at every key
press and replace its inode (breaking a link someone made to it). Each line goes out in one os.write on an
O_APPEND descriptor, then fsync: a killed process leaves the whole line or none of it; only a power cut
or a full disk mid-write can leave part of the last line. A short write is cut back off at once; a torn
last line left by a power cut is fenced off with a newline before the next line, never glued to it (and
kept: validation then names it as a bad line, for a person to look at).

Each line is checked with engine.data.validate_dataset before it is written, so the file only gains rows
that training reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.atomic import fsync_dir
from engine.data.sources import RowSource
from engine.data.validate import validate_dataset

LABELS = ("desirable", "undesirable")


class LabelError(ValueError):
    """A labelled conversation that would not be a valid row, or a file that cannot take it."""


def labelled_row(prompt: list[dict], answer: str, label: str) -> dict:
    """The seed-schema row: the prompt's turns, then the answer as the assistant's turn."""
    if label not in LABELS:
        raise LabelError(f"label must be one of {', '.join(LABELS)}")
    turns = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return {"conversations": turns + [{"role": "assistant", "content": answer}], "label": label}


def check_row(row: dict) -> None:
    """Raise LabelError unless validate_dataset reads `row` as one valid, labelled row."""
    source = RowSource("labelled answer", "JSONL", "line", lambda state: iter([(1, row, None)]))
    report, _ = validate_dataset(source)
    if report.valid != 1 or report.error_lines:
        raise LabelError("; ".join(str(i) for i in report.issues) or "not a valid row")


def append_labelled(path: str | Path, prompt: list[dict], answer: str, label: str) -> int:
    """Append the labelled conversation to the JSONL file at `path` (made, with its folder, if missing),
    durably; return the line number it was written on."""
    row = labelled_row(prompt, answer, label)
    check_row(row)
    return append_line(path, json.dumps(row, ensure_ascii=False))


def append_line(path: str | Path, line: str) -> int:
    """One whole line at the end of the file, flushed to disk; its line number."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        fence = size > 0 and not _ends_with_newline(path, size)
        data = ("\n" if fence else "").encode() + (line + "\n").encode("utf-8")
        try:
            written = os.write(fd, data)
        except BaseException:
            _cut_back(fd, size)
            raise
        if written != len(data):  # a full disk: take the part back off rather than leave half a row
            _cut_back(fd, size)
            raise LabelError(f"{path}: only {written} of {len(data)} bytes could be written (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)  # the new file's name survives a power cut too
    return _count_lines(path)


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1) == b"\n"


def _cut_back(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
