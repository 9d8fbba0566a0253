"""Parse one JSONL record into a normalized Conversation, or say precisely what is wrong with it.

Accepted shapes (one JSON object per line):
  seed:        {"conversations": [{"role", "content"} | {"from", "value"}], "label": "desirable"}
  mlx-lm chat: {"messages": [{"role", "content"}], "tools": [...]}
  completions: {"prompt": "...", "completion": "..."}
  plain text:  {"text": "..."}
  pairs:       {"prompt" | "messages", "chosen", "rejected"} (DPO/ORPO; engine/data/pairs.py)
"""

from __future__ import annotations

import reprlib
import unicodedata
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "bot": "assistant", "model": "assistant", "tool": "tool", "function": "tool", "observation": "tool",
    "ipython": "tool",
}
LABELS = {"desirable": "desirable", "undesirable": "undesirable", True: "desirable", False: "undesirable"}
TEXT_LABELS = {"true": True, "false": False, "1": True, "0": False}  # how CSV cells and pandas write booleans
# Characters that show nothing: whitespace, format characters (zero-width space, joiners, BOM, soft
# hyphen, direction marks), controls and separators, plus the letters and symbols that render blank.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # Hangul fillers, braille blank


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: empty, whitespace or only invisible characters (a zero-width space)."""
    return all(c.isspace() or c in BLANK_CHARACTERS or unicodedata.category(c) in INVISIBLE_CATEGORIES
               for c in text)


def _blank_reason(text: str, what: str) -> str:
    """`what`, and which invisible characters the text holds when it is not plain whitespace."""
    hidden = sorted({f"U+{ord(c):04X}" for c in text if not c.isspace()})
    return what + (f" (only invisible characters: {', '.join(hidden[:5])})" if hidden else "")


@dataclass(frozen=True)
class LineIssue:
    line: int  # the line, or the row's index (see unit)
    field: str  # where in the record: "conversations[2].role", "label", "" for the whole line
    reason: str
    severity: str = "error"  # "error" or "warning"
    unit: str = "line"  # "line" (text files: from 1) or "row" (tables and JSON arrays: the index from 0)
    source: str = ""  # the file, when several are mixed

    def __str__(self) -> str:
        where = f" {self.field}:" if self.field else ""
        return f"{self.source + ': ' if self.source else ''}{self.unit} {self.line}:{where} {self.reason}"


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)  # [{"role", "content"}], roles normalized
    tools: list | None = None
    label: str | None = None
    format: str = "chat"  # "seed", "chat", "completion", "text" or "pair"
    text: str | None = None  # only for the plain-text format
    rejected: list[dict] | None = None  # a pair row (engine/data/pairs.py): prompt + the rejected answer
    prompt_turns: int = 0  # a pair row: messages shared by both answers (context, not compared)

    def rejected_conversation(self) -> "Conversation":
        return Conversation(list(self.rejected or []), self.tools, self.label, self.format)


def _label(record: dict, line: int, issues: list[LineIssue]) -> str | None:
    if "label" not in record or record["label"] is None:
        return None
    raw = record["label"]
    key = raw.strip().lower() if isinstance(raw, str) else raw
    key = TEXT_LABELS.get(key, key) if isinstance(key, str) else key
    if isinstance(key, (int, float)) and not isinstance(key, bool) and key in (0, 1):  # a 0/1 column (pandas
        key = bool(key)  # writes 1.0/0.0 once a value is missing)
    if isinstance(key, (str, bool)) and key in LABELS:
        return LABELS[key]
    issues.append(LineIssue(line, "label", f"bad label {reprlib.repr(raw)}: use \"desirable\" or \"undesirable\" "
                            "(or true/false, 1/0)"))
    return None


def _messages(raw, key: str, line: int, issues: list[LineIssue]) -> list[dict]:
    if not isinstance(raw, list):
        issues.append(LineIssue(line, key, f"must be a list of messages, got {type(raw).__name__}"))
        return []
    if not raw:
        issues.append(LineIssue(line, key, "is empty: a conversation needs at least a user and an "
                                "assistant message"))
        return []
    out = []
    for i, msg in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            issues.append(LineIssue(line, where, f"must be an object with role and content, got "
                                    f"{type(msg).__name__}"))
            continue
        if "role" in msg or "content" in msg:
            role_key, content_key = "role", "content"
        elif "from" in msg or "value" in msg:
            role_key, content_key = "from", "value"
        else:
            issues.append(LineIssue(line, where, "missing role and content (or from and value)"))
            continue
        role = msg.get(role_key)
        content = msg.get(content_key)
        if role is None:
            issues.append(LineIssue(line, f"{where}.{role_key}", "missing role"))
            continue
        if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
            issues.append(LineIssue(line, f"{where}.{role_key}", f"unknown role {reprlib.repr(role)}: use one of "
                                    + ", ".join(ROLES)))
            continue
        norm_role = ROLE_ALIASES[role.strip().lower()]
        if "tool_calls" in msg and msg["tool_calls"] is not None and \
                _tool_calls_issue(msg["tool_calls"], f"{where}.tool_calls", line, issues):
            continue
        has_tool_calls = norm_role == "assistant" and isinstance(msg.get("tool_calls"), list) and msg["tool_calls"]
        if content is None and not has_tool_calls:
            issues.append(LineIssue(line, f"{where}.{content_key}", "missing content"))
            continue
        if isinstance(content, list):  # OpenAI content parts: the text parts, joined
            content = _joined_parts(content, f"{where}.{content_key}", line, issues)
            if content is None:
                continue
        if content is not None and not isinstance(content, str):
            issues.append(LineIssue(line, f"{where}.{content_key}", f"content must be a string, got "
                                    f"{type(content).__name__}"))
            continue
        if not has_tool_calls and is_blank(content):
            issues.append(LineIssue(line, f"{where}.{content_key}", _blank_reason(content, "empty content")))
            continue
        norm = {"role": norm_role, "content": content or ""}
        for extra in ("tool_calls", "tool_call_id", "name"):
            if msg.get(extra) is not None:  # a table column fills absent keys with null
                norm[extra] = msg[extra]
        out.append(norm)
    return out


def _joined_parts(parts: list, where: str, line: int, issues: list[LineIssue]) -> str | None:
    """OpenAI's content parts ([{"type": "text", "text": ...}]) as one string; any other part is an error:
    these models read text only."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(kind, str) and kind != "text":
            issues.append(LineIssue(line, f"{where}[{j}]", f"a {reprlib.repr(kind)} part: lora-tui trains "
                                    "text-only models; remove non-text parts (or describe them in text)"))
            return None
        else:
            issues.append(LineIssue(line, f"{where}[{j}]", 'a content part must be {"type": "text", "text": '
                                    f'"..."}}, got {reprlib.repr(part)}'))
            return None
    return "\n".join(texts)


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _tool_calls_issue(calls, where: str, line: int, issues: list[LineIssue]) -> bool:
    """Add an issue when tool_calls is not a list of calls, each an object naming its function."""
    before = len(issues)
    if not isinstance(calls, list):
        issues.append(LineIssue(line, where, f"must be a list of tool calls (objects), got {_type_name(calls)}"))
        return True
    for i, call in enumerate(calls):
        at = f"{where}[{i}]"
        if not isinstance(call, dict):
            issues.append(LineIssue(line, at, f"must be an object (a tool call), got {_type_name(call)}"))
            continue
        function = call.get("function", call)
        if not isinstance(function, dict):
            issues.append(LineIssue(line, f"{at}.function", f"must be an object with name and arguments, got "
                                    f"{_type_name(function)}"))
            continue
        name = function.get("name")
        if not isinstance(name, str) or is_blank(name):
            issues.append(LineIssue(line, f"{at}{'.function' if 'function' in call else ''}.name",
                                    "a tool call needs the function's name (a string)"))
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, (dict, str)):
            issues.append(LineIssue(line, f"{at}{'.function' if 'function' in call else ''}.arguments",
                                    f"must be an object (or a JSON string), got {_type_name(arguments)}"))
    return len(issues) > before


def _check_order(messages: list[dict], key: str, line: int, issues: list[LineIssue]) -> None:
    """System first (optional), then user; assistant answers user or tool; tool follows assistant."""
    prev = None
    for i, msg in enumerate(messages):
        role = msg["role"]
        where = f"{key}[{i}].role"
        if role == "system":
            if i != 0:
                issues.append(LineIssue(line, where, "system message must come first"))
                return
        elif prev in (None, "system"):
            if role != "user":
                issues.append(LineIssue(line, where, f"broken alternation: the first turn must be user, "
                                        f"got {role}"))
                return
        elif role == "user" and prev == "user":
            issues.append(LineIssue(line, where, "broken alternation: two user turns in a row"))
            return
        elif role == "assistant" and prev == "assistant":
            issues.append(LineIssue(line, where, "broken alternation: two assistant turns in a row"))
            return
        elif role == "tool" and prev not in ("assistant", "tool"):
            issues.append(LineIssue(line, where, f"broken alternation: a tool result must follow an "
                                    f"assistant turn, not {prev}"))
            return
        elif role == "user" and prev == "tool":
            issues.append(LineIssue(line, where, "broken alternation: after a tool result the "
                                    "assistant must answer"))
            return
        prev = role
    if not any(m["role"] == "assistant" for m in messages):
        issues.append(LineIssue(line, key, "no assistant turn: nothing to train on"))


def parse_conversation(record, line: int) -> tuple[Conversation | None, list[LineIssue]]:
    issues: list[LineIssue] = []
    """One conversation row (not a pair row: engine.data.pairs.parse_record sends those elsewhere)."""
    if not isinstance(record, dict):
        return None, [LineIssue(line, "", f"a line must be a JSON object, got {type(record).__name__}")]
    label = _label(record, line, issues)
    if "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        messages = _messages(record[key], key, line, issues)
        if not issues:
            _check_order(messages, key, line, issues)
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            issues.append(LineIssue(line, "tools", f"must be a list of tool schemas, got {type(tools).__name__}"))
        elif tools:
            for i, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    issues.append(LineIssue(line, f"tools[{i}]", f"must be an object (a tool schema), got "
                                            f"{_type_name(tool)}"))
        conv = Conversation(messages, tools, label, "seed" if key == "conversations" else "chat")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            value = record.get(key)
            if value is None:
                issues.append(LineIssue(line, key, f"missing {key}"))
            elif not isinstance(value, str):
                issues.append(LineIssue(line, key, f"must be a string, got {type(value).__name__}"))
            elif key == "completion" and is_blank(value):
                issues.append(LineIssue(line, key, _blank_reason(value, "empty completion") + ": nothing to "
                                        "train on"))
        conv = Conversation([{"role": "user", "content": record.get("prompt") or ""},
                             {"role": "assistant", "content": record.get("completion") or ""}],
                            None, label, "completion")
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            issues.append(LineIssue(line, "text", f"must be a string, got {type(text).__name__}"))
        elif is_blank(text):
            issues.append(LineIssue(line, "text", _blank_reason(text, "empty text")))
        conv = Conversation([], None, label, "text", text if isinstance(text, str) else None)
    else:
        keys = ", ".join(sorted(map(str, record))[:5]) or "none"
        return None, issues + [LineIssue(line, "", f"missing conversation: expected a conversations, "
                                         f"messages, prompt/completion, chosen/rejected or text field "
                                         f"(found: {keys})")]
    return (None if issues else conv), issues

