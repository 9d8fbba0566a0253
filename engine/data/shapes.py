"""Row shapes read before the record parser sees a row: `data.columns` renames a file's fields to ours,
and Alpaca rows become conversations.

  Alpaca: {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}, as
  LLaMA-Factory and axolotl read it (instruction and input joined by a newline); with "chosen" /
  "rejected" instead of "output" it is a pair row.
"""

from __future__ import annotations

import reprlib

from engine.data.records import LineIssue, is_blank

FIELDS = ("messages", "conversations", "prompt", "completion", "text", "chosen", "rejected", "label", "tools",
          "instruction", "input", "output", "system", "history")


def drop_nulls(value):
    """A table's row without its nulls, at every depth: Arrow stores rows of one column as one struct type,
    so keys a row lacks (another tool's parameters, a message without tool_calls) come back as null."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def rename_columns(record, columns: dict[str, str]):
    """A record with the user's column names turned into ours ({our field: their column})."""
    if not columns or not isinstance(record, dict):
        return record
    out = dict(record)
    for ours, theirs in columns.items():
        if theirs in record and ours != theirs:
            out.pop(theirs)
            out[ours] = record[theirs]
    return out


def is_alpaca(record) -> bool:
    return isinstance(record, dict) and "instruction" in record and not (
        "messages" in record or "conversations" in record)


def from_alpaca(record: dict, line: int) -> tuple[dict | None, list[LineIssue]]:
    """An Alpaca row as a chat (or pair) record, or its problems named by Alpaca's own fields."""
    issues: list[LineIssue] = []

    def text(key: str, required: bool) -> str:
        value = record.get(key)
        if value is None:
            if required:
                issues.append(LineIssue(line, key, f"missing {key}"))
            return ""
        if not isinstance(value, str):
            issues.append(LineIssue(line, key, f"must be a string, got {type(value).__name__}"))
            return ""
        return value

    instruction, extra = text("instruction", True), text("input", False)
    system = text("system", False)
    if not issues and is_blank(instruction) and is_blank(extra):
        issues.append(LineIssue(line, "instruction", "empty instruction (and no input): nothing to answer"))
    turns = ([{"role": "system", "content": system}] if system.strip() else []) + _history(record, line, issues)
    user = "\n".join(part for part in (instruction, extra) if part.strip())
    prompt = turns + [{"role": "user", "content": user}]
    out = {k: record[k] for k in ("label", "tools") if k in record}
    if "chosen" in record or "rejected" in record:
        out |= {"prompt": prompt, "chosen": record.get("chosen"), "rejected": record.get("rejected")}
    else:
        answer = text("output", True)
        if not issues and is_blank(answer):
            issues.append(LineIssue(line, "output", "empty output: nothing to train on"))
        out["messages"] = prompt + [{"role": "assistant", "content": answer}]
    return (None if issues else out), issues


def _history(record: dict, line: int, issues: list[LineIssue]) -> list[dict]:
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        issues.append(LineIssue(line, "history", f"must be a list of [user, assistant] pairs, got "
                                f"{type(history).__name__}"))
        return []
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            issues.append(LineIssue(line, f"history[{i}]", f"must be a [user, assistant] pair of strings, got "
                                    f"{reprlib.repr(pair)}"))
            return []
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns
