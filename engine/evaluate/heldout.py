"""Held-out items for the metrics, read from anything data.path reads (engine.data.sources: JSONL, a JSON
array, CSV/TSV, Parquet, Arrow, `datasets` folders, hub ids) through the training rows' own parser.

An item is a prompt and its reference:
  chat rows (messages / conversations)  the turns before the last assistant turn; that turn's content (or
                                         its tool call, as {name, arguments})
  prompt / completion                   the prompt as a user turn; the completion
  Alpaca (instruction, input, output)   instruction and input as a user turn; the output
  pair rows (prompt, chosen, rejected)  the prompt; the chosen answer
A "reference" or "expected" field, when present, is the reference instead, and the row then needs no answer
of its own: data/heldout.jsonl's tool-call items are {"messages": [...], "expected": {name, arguments} or
null}. An optional "schema" is the item's JSON Schema (metric json), "id" its name in examples.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.data.records import ROLE_ALIASES, LineIssue, is_blank
from engine.data.shapes import drop_nulls, rename_columns
from engine.data.sources import open_source
from engine.data.sources.state import BLANK, DatasetError
from engine.data.sources.text import decode_cells
from engine.data.validate import _parse
from engine.evaluate.metrics import MetricOptions, expected_call, reference_text, schema_problem

REFERENCE_KEYS = ("reference", "expected")
# Stands in for an answer given apart (a reference field), so the row parses as a training row; never scored.
PLACEHOLDER = "\ue000lora-tui-reference\ue001"
NEEDS = ("a held-out prompt needs messages (or a prompt, or an Alpaca instruction) and its reference: the last "
         "assistant turn, the completion, the output, or a reference/expected field")
TEXT_METRICS = ("exact", "contains", "regex", "rouge_l", "chrf")


@dataclass
class HeldoutItem:
    where: str  # "line 3" (text files) or "row 0" (tables), as errors and examples name it
    messages: list[dict]  # the prompt: every turn before the answer
    tools: list | None
    reference: object  # a text; a tool call's {name, arguments}, or None for "no tool"
    schema: dict | bool | None = None  # the item's own JSON Schema (metric json)
    id: str | None = None


def load_items(path: str | Path, columns: dict[str, str] | None = None, limit: int = 0,
               metrics: list[str] | tuple = (), options: MetricOptions = MetricOptions()) -> list[HeldoutItem]:
    """The first `limit` items (0 = all) of a held-out file, each checked for `metrics` (a tool_call reference
    is a call or null, a regex reference compiles): a bad row raises DatasetError naming the file and row."""
    try:
        source = open_source(path)
    except DatasetError as exc:
        raise DatasetError(f"evaluation.heldout_path: {exc}; name a held-out file or set it to \"\" for none") from None
    items: list[HeldoutItem] = []
    try:
        for number, record, error in source.rows():
            where = f"{source.unit} {number}"
            if error is not None:
                raise DatasetError(f"{path}: {_issue_text(LineIssue(number, *error, unit=source.unit))}")
            if record is BLANK:
                continue
            item = _item(record, where, source, dict(columns or {}))
            _check(item, metrics, options, f"{path}: {where}")
            items.append(item)
            if limit and len(items) >= limit:
                break
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatasetError(f"evaluation.heldout_path: {path}: {why}") from None
    if source.state.ended:
        raise DatasetError(f"{path}: {source.state.ended}")
    return items


def _issue_text(issue: LineIssue) -> str:
    return f"{issue.unit} {issue.line}: " + (f"{issue.field}: " if issue.field else "") + issue.reason


def _item(record, where: str, source, columns: dict[str, str]) -> HeldoutItem:
    path = source.path
    if not isinstance(record, dict):
        raise DatasetError(f"{path}: {where}: {NEEDS}; got a JSON {type(record).__name__}")
    record = dict(rename_columns(record, columns))
    key = next((k for k in REFERENCE_KEYS if k in record), None)
    reference = record.pop(key) if key else None
    schema, ident = record.pop("schema", None), record.pop("id", None)
    if source.arrow:  # a table fills the keys a row lacks with null (a struct of every tool's arguments)
        record, reference = drop_nulls(record), drop_nulls(reference)
    if source.cells:  # CSV cells and table strings may hold JSON: messages, an expected call, a schema
        record, error = decode_cells(record)
        if error:
            raise DatasetError(f"{path}: {where}: {error[0]}: {error[1]}")
        if key == "expected" and isinstance(reference, str):
            reference = _json_cell(reference, path, where, "expected")
        if isinstance(schema, str):
            schema = _json_cell(schema, path, where, "schema")
    if key:
        _stand_in_answer(record)
    conv, issues = _parse(record, 0, {}, False, False)
    errors = [i for i in issues if i.severity == "error"]
    if conv is None or errors or conv.format == "text":
        why = f" ({errors[0].field + ': ' if errors and errors[0].field else ''}{errors[0].reason})" if errors else ""
        raise DatasetError(f"{path}: {where}: {NEEDS}{why}")
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    if key is None:
        reference = _answer_of(conv.messages[last])
    return HeldoutItem(where, conv.messages[:last], conv.tools, reference, schema,
                       None if ident is None else str(ident))


def _json_cell(text: str, path, where: str, field: str):
    """A cell holding an object (or null) as JSON text; any other text stays text."""
    if text.strip() != "null" and not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{path}: {where}: {field}: invalid JSON ({exc})") from None


def _stand_in_answer(record: dict) -> None:
    """Give a row whose reference is a field of its own an answer turn, so that the training parser, which
    wants one, reads its prompt; an answer the row already has stays (and is replaced by the reference)."""
    key = next((k for k in ("conversations", "messages") if k in record), None)
    if key is not None:
        turns = record[key]
        if isinstance(turns, list) and turns and not _is_assistant(turns[-1]):
            record[key] = turns + [{"role": "assistant", "content": PLACEHOLDER}]
    elif "chosen" in record or "rejected" in record:
        return
    elif "prompt" in record and "completion" not in record:
        record["completion"] = PLACEHOLDER
    elif "instruction" in record and "output" not in record:
        record["output"] = PLACEHOLDER


def _is_assistant(turn) -> bool:
    role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
    return isinstance(role, str) and ROLE_ALIASES.get(role.strip().lower()) == "assistant"


def _answer_of(turn: dict):
    """A last assistant turn as a reference: its text, or its (first) tool call when it has no text."""
    calls = turn.get("tool_calls")
    if is_blank(turn["content"]) and isinstance(calls, list) and calls and isinstance(calls[0], dict):
        call = calls[0].get("function", calls[0])
        arguments = call.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass  # left as text: the tool_call check names the row
        return {"name": call.get("name"), "arguments": arguments}
    return turn["content"]


def _check(item: HeldoutItem, metrics, options: MetricOptions, where: str) -> None:
    """What the chosen metrics need of a reference, checked before anything is generated."""
    if "tool_call" in metrics:
        try:
            expected_call(item.reference)
        except ValueError as exc:
            raise DatasetError(f"{where}: {NEEDS}; for the tool_call metric: expected {{name, arguments}}, or "
                               f"null when no tool should be called ({exc})") from None
    text_metrics = [m for m in metrics if m in TEXT_METRICS and not (m == "regex" and options.pattern)]
    if text_metrics and is_blank(reference_text(item.reference)):
        raise DatasetError(f"{where}: {NEEDS}; the reference is empty, and {text_metrics[0]} compares with it")
    if "regex" in metrics and options.pattern is None:
        try:
            re.compile(reference_text(item.reference))
        except re.error as exc:
            raise DatasetError(f"{where}: the regex metric reads the reference as a pattern, and this one does "
                               f"not compile: {exc} (or set evaluation.regex)") from None
    if "json" in metrics and item.schema is not None and (problem := schema_problem(item.schema)):
        raise DatasetError(f"{where}: schema: {problem}")
