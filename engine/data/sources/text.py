"""Text containers, read as a stream in bounded memory: JSONL, a JSON array, CSV and TSV.

Each reader yields `(number, record, error)`: number is the line the record starts on, record a decoded
object (BLANK for a blank line, None for an unreadable record) and error, for an unreadable one, (field, reason).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Iterator

from engine.data.sources.state import BLANK, ReadState

MAX_LINE_BYTES = 10 * 1024 * 1024
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: paired (an emoji) or lone
READ_CHUNK = 1 << 20


def iter_lines(path: Path, state: ReadState | None = None) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) per line; text is None when the line is unusable as text. `state.done`
    follows the bytes read, for progress."""
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
                if state is not None:
                    state.done = fh.tell()
                yield number, None, f"line is longer than {MAX_LINE_BYTES // (1024 * 1024)} MB"
                continue
            if state is not None:
                state.done += len(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark
            if b"\x00" in raw:
                yield number, None, "contains NUL bytes: binary data, not JSON text"
                continue
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as exc:
                yield number, None, f"invalid UTF-8 at byte {exc.start + 1} of the line"


def decode_json(text: str, field: str = "") -> tuple[object, tuple[str, str] | None]:
    """A JSON text decoded, or (field, reason) when it cannot be (one line, for a person)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, (field, f"invalid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return None, (field, "invalid JSON: nested too deeply")
    except ValueError as exc:  # an integer over Python's digit limit (4300)
        return None, (field, f"unreadable number ({str(exc).split(';')[0]}): write it as a string")
    if SURROGATE_ESCAPE.search(text) and (where := _surrogate_field(value)) is not None:
        where = ".".join(p for p in (field, where) if p)
        return None, (where, "contains a lone surrogate escape (\\ud800-\\udfff without its pair): not a "
                      "character, cannot be encoded as UTF-8; fix or remove the escape")
    return value, None


def jsonl_rows(path: Path, state: ReadState) -> Iterator[tuple[int, object, str | None]]:
    for number, text, error in iter_lines(path, state):
        if error:
            yield number, None, ("", error)
        elif not text.strip():
            yield number, BLANK, None
        else:
            yield number, *decode_json(text)


def json_array_rows(path: Path, state: ReadState) -> Iterator[tuple[int, object, str | None]]:
    """The elements of a top-level JSON array, numbered by index from 0 (as `json.load(f)[i]`), decoded one
    at a time from a sliding buffer (a 1 GB array is never held whole). An element that does not parse
    ends the read: past it the array's structure is unknown."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as fh:
        reader = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="strict")
        buf, line, pos, eof, index = "", 1, 0, False, 0

        def at_line() -> str:
            return f"line {line}: "

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            piece = reader.read(READ_CHUNK)
            state.done = fh.tell()
            if not piece:
                eof = True
                return False
            buf, pos = buf[pos:] + piece, 0
            return True

        def skip_space() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        try:
            skip_space()
            if pos >= len(buf) or buf[pos] != "[":
                yield index, None, state.end(at_line() + "a .json file must hold one JSON array of records (or "
                                             "use JSONL: one per line)")
                return
            pos += 1
            expect_item = True
            while True:
                skip_space()
                if pos >= len(buf):
                    yield index, None, state.end(at_line() + "the JSON array is not closed (missing ']'): the "
                                                 "file may be cut short")
                    return
                if buf[pos] == "]":
                    return
                if not expect_item:
                    if buf[pos] != ",":
                        yield index, None, state.end(at_line() + "invalid JSON: expected ',' or ']' between "
                                                     f"records, got {buf[pos]!r}")
                        return
                    pos += 1
                    expect_item = True
                    continue
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as exc:
                        if len(buf) - pos > MAX_LINE_BYTES or not fill():
                            yield index, None, state.end(at_line() + f"invalid JSON: {exc.msg} (the array "
                                                         "cannot be read past here)")
                            return
                    except RecursionError:
                        yield index, None, state.end(at_line() + "invalid JSON: nested too deeply")
                        return
                line += buf.count("\n", pos, end)
                pos, expect_item = end, False
                yield index, value, None
                index += 1
        except UnicodeDecodeError as exc:
            yield index, None, state.end(at_line() + f"invalid UTF-8 (byte {exc.start + 1} of a chunk): save "
                                         "the file as UTF-8")


STRUCTURED = ("messages", "conversations", "tools", "chosen", "rejected", "prompt", "history")
LENIENT = ("prompt", "chosen", "rejected")  # text that may start with "[" or "{" without being JSON


def csv_rows(path: Path, state: ReadState, delimiter: str) -> Iterator[tuple[int, object, str | None]]:
    """Rows of a CSV/TSV file with a header, as {column: text}, an empty cell left out (a missing value).
    Cells holding JSON (messages, tools, ...) stay text here: decode_cells decodes them once the column map
    has named them (the source says `cells`)."""
    csv.field_size_limit(MAX_LINE_BYTES)
    with open(path, "rb") as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="strict", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            if len(set(header)) != len(header):
                dup = next(h for h in header if header.count(h) > 1)
                yield 1, None, state.end(f"the header names column {dup!r} twice")
                return
            start = reader.line_num + 1
            for cells in reader:
                state.done = fh.tell()
                number, start = start, reader.line_num + 1
                if not cells or all(not c.strip() for c in cells):
                    yield number, BLANK, None
                elif len(cells) != len(header):
                    yield number, None, ("", f"has {len(cells)} cells, the header has {len(header)} columns "
                                         "(an unquoted delimiter or newline inside a cell?)")
                else:
                    # An empty cell is a missing value; JSON text in cells is decoded by the reader's user,
                    # after data.columns has renamed them (validate._parse, evaluate.heldout).
                    yield number, {key: cell for key, cell in zip(header, cells) if cell != ""}, None
        except UnicodeDecodeError as exc:
            yield reader.line_num + 1, None, state.end(f"invalid UTF-8 (byte {exc.start + 1} of a chunk): save "
                                                       "the file as UTF-8")
        except csv.Error as exc:
            yield reader.line_num, None, state.end(f"unreadable CSV: {exc}")


def decode_cells(record: dict) -> tuple[dict | None, tuple[str, str] | None]:
    """A table's row with its structured fields decoded where a cell holds them as JSON text (CSV has only
    text; Parquet files often store messages or tools as JSON strings). messages, conversations, tools and
    history must then parse; prompt, chosen and rejected are decoded only when they hold a JSON list of
    messages (a prompt may well start with "[INST]")."""
    out = record
    for key in STRUCTURED:
        cell = record.get(key)
        if not isinstance(cell, str) or cell.lstrip()[:1] not in ("[", "{"):
            continue
        value, error = decode_json(cell, key)
        if key in LENIENT and not isinstance(value, list):
            continue
        if error:
            return None, error
        out = out if out is not record else dict(record)
        out[key] = value
    return out, None


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
