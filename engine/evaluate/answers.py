"""The final-answer metric on held-out conversations that end with a tool's result: does the model's answer
state the result's facts (faithful), and does it state a number that neither the user nor the tool gave
(made up). Items come from data/heldout_answers.jsonl (scripts/make_sample_data.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.evaluate.tool_calls import read_items
from engine.generate.reply import GenerationSettings, reply

PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,234.50" is 1234.50


@dataclass
class AnswerScore:
    prompts: int = 0
    faithful: int = 0  # every fact of the tool's result is in the answer
    made_up: int = 0  # the answer states a number that neither the user nor the tool gave
    examples: list[dict] = field(default_factory=list)

    def rate(self, what: str) -> float:
        return getattr(self, what) / self.prompts if self.prompts else 0.0

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "faithful": self.rate("faithful"), "made_up": self.rate("made_up")}


def numbers(text: str) -> list[str]:
    """The numbers `text` states, as written. A minus counts only where no digit precedes it, so a date's
    "2026-03-05" is 2026, 03 and 05, not 2026 and -3."""
    text = THOUSANDS.sub("", text)
    found = []
    for m in PLAIN_NUMBER.finditer(text):
        value = m.group()
        if value.startswith("-") and m.start() > 0 and text[m.start() - 1].isdigit():
            value = value[1:]
        found.append(value)
    return found


def _same(stated: str, source: float) -> bool:
    """`stated` equals `source`, or `source` rounded to as many decimals as `stated` shows ("17.5" for 17.46)."""
    decimals = len(stated.split(".")[1]) if "." in stated else None
    value = float(stated)
    return value == source or (decimals is not None and abs(value - round(source, decimals)) < 1e-9)


def _has_fact(text: str, fact: str) -> bool:
    # A numeric fact is compared as a number, so "17" matches "17°C" and "17.0" but not "170" or "1.7".
    if PLAIN_NUMBER.fullmatch(fact.strip()):
        return any(_same(n, float(fact)) for n in numbers(text))
    return fact.strip().lower() in text.lower()


def score_answer(text: str, item: dict) -> tuple[bool, bool]:
    """(faithful, made_up) for a final answer `text` to `item` (its "facts" and the messages it answers)."""
    faithful = all(_has_fact(text, fact) for fact in item["facts"])
    given = [float(n) for m in item["messages"] if m.get("role") in ("user", "tool") for n in numbers(m["content"])]
    made_up = any(not any(_same(n, g) for g in given) for n in numbers(text))
    return faithful, made_up


def load_answer_items(path: str | Path, limit: int | None = None) -> list[dict]:
    """Held-out final-answer items, one JSON object a line: {"id", "messages": [...], "facts": [str], "tool"}."""
    return read_items(path, limit, _answer_item, f"{path}: {{why}}; name a held-out answers file "
                      "(data/heldout_answers.jsonl)")


def _answer_item(line: str, where: str) -> dict:
    from engine.data import DatasetError
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc})") from None
    ok = (isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]
          and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                  for m in item["messages"])
          and isinstance(item.get("facts"), list) and item["facts"]
          and all(isinstance(f, str) and f.strip() for f in item["facts"]))
    if not ok:
        raise DatasetError(f"{where}: an answer item needs messages (a list of role/content objects ending "
                           "with the tool's result) and facts (a non-empty list of strings); fix or remove the line")
    return item


def answer_score(model, tokenizer, items: list[dict], max_tokens: int = 96, keep_examples: int = 3) -> AnswerScore:
    score = AnswerScore()
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)  # greedy, as tool_call_score
    for item in items:
        text = reply(model, tokenizer, item["messages"], settings)
        faithful, made_up = score_answer(text, item)
        score.prompts += 1
        score.faithful += faithful
        score.made_up += made_up
        if len(score.examples) < keep_examples:
            user = [m["content"] for m in item["messages"] if m.get("role") == "user"]
            score.examples.append({"prompt": user[-1] if user else "", "reply": text,
                                   "faithful": faithful, "made_up": made_up})
    return score
