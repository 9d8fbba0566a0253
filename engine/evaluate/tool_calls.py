"""The tool-call behaviour metric on held-out prompts: does the model call the expected tool with the
expected arguments (`lora-tui train --eval-only`, bench/bench_finetune.py), and, on prompts whose
"expected" is null, does it answer without calling a tool at all."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.generate.reply import GenerationSettings, reply


CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass
class ToolCallScore:
    prompts: int = 0
    well_formed: int = 0  # a <tool_call> with JSON holding name and arguments
    right_tool: int = 0
    exact: int = 0  # right tool and exactly the expected arguments
    # The four counts above cover the tool prompts only, so figures from before no-tool prompts existed
    # stay comparable; the no-tool prompts are counted apart.
    no_tool_prompts: int = 0
    no_tool_correct: int = 0  # the reply holds no <tool_call>
    examples: list[dict] = field(default_factory=list)

    def rate(self, what: str) -> float:
        return getattr(self, what) / self.prompts if self.prompts else 0.0

    def to_dict(self) -> dict:
        no_tool = self.no_tool_correct / self.no_tool_prompts if self.no_tool_prompts else None
        return {"prompts": self.prompts, "well_formed": self.rate("well_formed"),
                "right_tool": self.rate("right_tool"), "exact": self.rate("exact"),
                "no_tool_prompts": self.no_tool_prompts, "no_tool": no_tool}


def _norm(value):
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k).lower(): _norm(v) for k, v in value.items()}
    return value


def score_call(text: str, expected: dict) -> tuple[bool, bool, bool]:
    m = CALL.search(text)
    if not m:
        return False, False, False
    try:
        call = json.loads(m.group(1))
    except ValueError:
        return False, False, False
    if not isinstance(call, dict) or "name" not in call or not isinstance(call.get("arguments"), dict):
        return False, False, False
    right = call["name"] == expected["name"]
    return True, right, right and _norm(call["arguments"]) == _norm(expected["arguments"])


def load_heldout(path: str | Path, limit: int | None = None) -> list[dict]:
    """Held-out prompts, one JSON object a line: {"messages": [...], "expected": {"name", "arguments"}}, or
    "expected": null for a prompt that no tool fits."""
    return read_items(path, limit, _heldout_item, f"evaluation.heldout_path: {path}: {{why}}; name a held-out "
                      "file or set it to \"\" for none")


def read_items(path: str | Path, limit: int | None, parse, unreadable: str) -> list[dict]:
    """Each non-blank line of a held-out file through `parse(line, "path:line N")`; an unreadable file raises
    DatasetError with `unreadable` (its {why} filled in)."""
    from engine.data import DatasetError
    items = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    items.append(parse(line, f"{path}:line {number}"))
                    if limit and len(items) >= limit:
                        break
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatasetError(unreadable.replace("{why}", why)) from None
    return items


def _heldout_item(line: str, where: str) -> dict:
    from engine.data import DatasetError
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc})") from None
    expected = item.get("expected", ...) if isinstance(item, dict) else ...
    # null means "no tool should be called"; a missing key is still an error (most likely a typo).
    if not (isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in item["messages"])
            and (expected is None or isinstance(expected, dict) and "name" in expected
                 and isinstance(expected.get("arguments"), dict))):
        raise DatasetError(f"{where}: a held-out prompt needs messages (a list of role/content objects) and "
                           "expected {name, arguments}, or expected null when no tool should be called")
    return item


def tool_call_score(model, tokenizer, items: list[dict], max_tokens: int = 96, keep_examples: int = 3) -> ToolCallScore:
    score = ToolCallScore()
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    for item in items:
        text = reply(model, tokenizer, item["messages"], settings)
        if item["expected"] is None:
            score.no_tool_prompts += 1
            score.no_tool_correct += "<tool_call>" not in text
            continue
        formed, right, exact = score_call(text, item["expected"])
        score.prompts += 1
        score.well_formed += formed
        score.right_tool += right
        score.exact += exact
        if len(score.examples) < keep_examples:
            score.examples.append({"prompt": item["messages"][-1]["content"], "reply": text, "exact": exact})
    return score
