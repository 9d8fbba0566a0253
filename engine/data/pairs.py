"""Pair rows for DPO and ORPO: a prompt with a chosen and a rejected answer, in the shapes TRL and
LLaMA-Factory read:

  {"prompt": "...", "chosen": "...", "rejected": "..."}                         strings
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}          TRL's conversational form
  {"messages" | "conversations": [prompt turns], "chosen": {message}, "rejected": {message}}   LLaMA-Factory
  {"chosen": [whole conversation], "rejected": [whole conversation]}            implicit prompt (shared start)

A row becomes one Conversation: `messages` = prompt + chosen, `rejected` = prompt + rejected, and
`prompt_turns` the shared part, whose assistant turns (if any) are context, not what is compared.
"""

from __future__ import annotations

import numpy as np

from engine.data.encode import ChatEncoder, Encoded, truncate
from engine.data.records import Conversation, LineIssue, _check_order, _label, _messages, _type_name, \
    parse_conversation

PROMPT_KEYS = ("prompt", "messages", "conversations")


def parse_record(record, line: int) -> tuple[Conversation | None, list[LineIssue]]:
    """Any row: a pair row here, every other shape by engine.data.records."""
    if not (isinstance(record, dict) and ("chosen" in record or "rejected" in record)):
        return parse_conversation(record, line)
    issues: list[LineIssue] = []
    label = _label(record, line, issues)
    conv, more = parse_pair(record, line, label)
    issues += more
    return (None if issues else conv), issues


def _answer(raw, key: str, line: int, issues: list[LineIssue]) -> list[dict]:
    """An answer as messages: a string is one assistant turn, an object one message, a list several."""
    if isinstance(raw, str):
        raw = [{"role": "assistant", "content": raw}]
    elif isinstance(raw, dict):
        raw = [raw]
    elif not isinstance(raw, list):
        issues.append(LineIssue(line, key, f"must be a string, a message or a list of messages, got "
                                f"{_type_name(raw)}"))
        return []
    return _messages(raw, key, line, issues)


def _prompt(record: dict, line: int, issues: list[LineIssue]) -> list[dict] | None:
    """The shared prompt as messages, or None when the row leaves it implicit."""
    key = next((k for k in PROMPT_KEYS if k in record), None)
    if key is None:
        return None
    raw = record[key]
    if key == "prompt" and isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    return _messages(raw, key, line, issues)


def _shared_start(chosen: list[dict], rejected: list[dict]) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def parse_pair(record: dict, line: int, label: str | None) -> tuple[Conversation | None, list[LineIssue]]:
    issues: list[LineIssue] = []
    for key in ("chosen", "rejected"):
        if key not in record or record[key] is None:
            issues.append(LineIssue(line, key, f"missing {key}: a pair row needs both chosen and rejected"))
    if issues:
        return None, issues
    prompt = _prompt(record, line, issues)
    chosen = _answer(record["chosen"], "chosen", line, issues)
    rejected = _answer(record["rejected"], "rejected", line, issues)
    if issues:
        return None, issues
    if prompt is None:  # TRL's implicit prompt: both hold the whole conversation
        shared = _shared_start(chosen, rejected)
        if shared == 0:
            return None, [LineIssue(line, "prompt", "missing prompt: give a prompt (or messages), or let chosen "
                                    "and rejected start with the same turns")]
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        return None, [LineIssue(line, "prompt", "must end with a user (or tool) turn: the answers follow it")]
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[0]["role"] != "assistant":
            issues.append(LineIssue(line, f"{key}[0].role", f"an answer must start with an assistant turn, got "
                                    f"{answer[0]['role']}"))
        else:
            _check_order(prompt + answer, key, line, issues)
    if not issues and chosen == rejected:
        issues.append(LineIssue(line, "rejected", "the same as chosen: nothing to prefer"))
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        issues.append(LineIssue(line, "tools", f"must be a list of tool schemas, got {_type_name(tools)}"))
    if issues:
        return None, issues
    return Conversation(prompt + chosen, tools or None, label, "pair", rejected=prompt + rejected,
                        prompt_turns=len(prompt)), []


def encode_rows(encoder: ChatEncoder, rows: list[tuple[int, Conversation]]) -> dict:
    """line -> Encoded (or EncodeError); a pair row -> (chosen, rejected), each scored on its answer only."""
    convs = [c for _, c in rows] + [c.rejected_conversation() for _, c in rows if c.rejected is not None]
    done = encoder.encode_many(convs)
    out, extra = {}, len(rows)
    for i, (number, conv) in enumerate(rows):
        out[number] = done[i]
        if conv.rejected is not None:
            context = sum(m["role"] == "assistant" for m in conv.messages[:conv.prompt_turns])
            pair = (done[i], done[extra])
            out[number] = tuple(answer_only(e, context) if encoder.mask_prompt else e for e in pair)
            extra += 1
    return out


def rejected_fit(enc: Encoded, number: int, max_len: int, key: str = "rejected") -> list[LineIssue]:
    """A pair's rejected answer: an error when truncation leaves none of it, else a warning when cut."""
    if enc.n_trained == 0:
        return [LineIssue(number, key, "no trained tokens after templating")]
    if len(enc) > max_len:
        if truncate(enc, max_len).n_trained == 0:
            return [LineIssue(number, key, f"too long: {len(enc)} tokens, and truncating to max_seq_length="
                              f"{max_len} removes the whole answer")]
        return [LineIssue(number, key, f"{len(enc)} tokens: truncated to max_seq_length={max_len}", "warning")]
    return []


def answer_only(enc: Encoded, context_turns: int) -> Encoded:
    """A pair's answer without the assistant turns of its shared prompt: the first `context_turns` runs of
    trained tokens are context, the same in chosen and rejected."""
    if context_turns == 0:
        return enc
    trained = enc.trained.copy()
    starts = np.flatnonzero(trained & ~np.concatenate([[False], trained[:-1]]))
    if len(starts) > context_turns:
        trained[:starts[context_turns]] = False
    return Encoded(enc.tokens, trained, enc.notes)
