"""The prompts a review asks both sources: every row of a dataset in any container engine.data.sources reads
(held-out prompts, or a training file), read the way validation reads rows.

A held-out row is a prompt with no answer yet ({"messages": [system, user]}), which validation calls a bad
row ("no assistant turn"): each row is given a placeholder answer before it is parsed, and that answer
is taken off again. A row that has answers gives the conversation before its last answer: the reviewed
answers stand in for that one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engine.data.records import ROLE_ALIASES
from engine.data.sources import RowSource, open_source
from engine.data.validate import first_conversations

PLACEHOLDER = "(review: the answer goes here)"
MAX_PROMPTS = 1000  # rows read at most: a review of more is never judged to the end


def read_prompts(path: str | Path, limit: int = MAX_PROMPTS) -> list[dict]:
    """[{"messages": prompt turns, "origin": "line 7"}] for each row with a prompt among the first `limit`
    (rows without one, e.g. plain {"text"} rows, are passed over). Raises DatasetError when the source
    cannot be read at all."""
    source = open_source(path)
    completed = dataclasses.replace(source, read=_completing(source))
    items = []
    for number, unit, conv in first_conversations(completed, limit=limit + 1):
        prompt = prompt_turns(conv)
        if prompt:
            items.append({"messages": prompt, "origin": f"{unit} {number}"})
    return items


def prompt_turns(conv) -> list[dict]:
    """The turns an answer follows: a pair row's shared prompt, or the conversation up to its last answer."""
    if conv.format == "text":
        return []
    turns = conv.messages[:conv.prompt_turns] if conv.rejected is not None else conv.messages
    end = len(turns)
    while end and turns[end - 1]["role"] == "assistant":
        end -= 1
    prompt = [dict(m) for m in turns[:end]]
    return prompt if prompt and prompt[-1]["role"] in ("user", "tool") else []


def _completing(source: RowSource):
    read = source.read

    def rows(state):
        for number, record, error in read(state):
            yield number, (_with_placeholder(record) if error is None else record), error
    return rows


def _with_placeholder(record):
    """The row with a placeholder answer where it has none, in the row's own message style; its label is
    dropped (a prompt needs none, and a bad one must not cost the prompt)."""
    if not isinstance(record, dict):
        return record
    row = {k: v for k, v in record.items() if k != "label"}
    if any(k in row for k in ("chosen", "rejected", "completion", "output")):
        return row
    for key in ("messages", "conversations", "prompt"):
        turns = row.get(key)
        if isinstance(turns, str) and key != "prompt":  # a table's cell holding JSON text
            try:
                turns = json.loads(turns)
            except ValueError:
                return row
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
            last = turns[-1]
            style = ("from", "value", "gpt") if "from" in last else ("role", "content", "assistant")
            if ROLE_ALIASES.get(str(last.get(style[0], "")).strip().lower()) != "assistant":
                turns = turns + [{style[0]: style[2], style[1]: PLACEHOLDER}]
            return {k: v for k, v in row.items() if k != key} | {"conversations" if key == "prompt" else key: turns}
        if key == "prompt" and isinstance(turns, str):
            return row | {"completion": PLACEHOLDER}
    if "instruction" in row:  # Alpaca
        return row | {"output": PLACEHOLDER}
    return row
