"""The held-out metrics a user picks in evaluation.metrics, each scoring one generated answer against its
reference, from 0 (miss) to 1 (hit), except chrf, on sacrebleu's own 0-100 scale.

  exact      the answer equals the reference, both stripped of surrounding whitespace
  contains   the reference appears in the answer, case-insensitive
  regex      re.search of the pattern (evaluation.regex, else the reference) finds a match in the answer
  json       the answer parses as JSON, and validates against a JSON Schema when one is given (the item's
             "schema", else evaluation.json_schema) with `jsonschema`
  rouge_l    Google's rouge-score: RougeScorer(["rougeL"]) F-measure (its tokenizer keeps a-z and 0-9 only:
             text in other scripts scores 0; use chrf there)
  chrf       sacrebleu's sentence-level chrF
  tool_call  engine/evaluate/tool_calls.score_call: the expected call, exactly (null: no tool called)

The libraries are imported when first used: the app imports the config (which names the metrics) at start-up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from engine.config.schema import HELDOUT_METRICS, ConfigError, ConfigIssue, EvaluationConfig
from engine.evaluate.tool_calls import CALL, score_call

METRICS = HELDOUT_METRICS


@dataclass(frozen=True)
class MetricOptions:
    pattern: re.Pattern | None = None  # evaluation.regex, compiled; None: each reference is its pattern
    schema: dict | None = None  # evaluation.json_schema, read and checked

    @classmethod
    def from_config(cls, e: EvaluationConfig) -> "MetricOptions":
        """The options of e's metrics; a schema that cannot be read or is no JSON Schema raises ConfigError
        naming evaluation.json_schema (validation already checked that the pattern compiles)."""
        pattern = re.compile(e.regex) if e.regex else None
        return cls(pattern, _read_schema(e.json_schema) if e.json_schema.strip() and "json" in e.metrics else None)


def _read_schema(raw: str) -> dict:
    def refuse(why: str):
        raise ConfigError([ConfigIssue("evaluation.json_schema", why)])

    text = raw
    if not raw.lstrip().startswith("{"):  # a file
        try:
            text = Path(raw).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            refuse(f"{raw}: {getattr(exc, 'strerror', None) or exc}")
    try:
        schema = json.loads(text)
    except ValueError as exc:
        refuse(f"{raw[:60]}: not JSON ({exc})")
    problem = schema_problem(schema)
    if problem:
        refuse(f"{raw[:60]}: {problem}")
    return schema


def schema_problem(schema) -> str | None:
    """Why `schema` is no JSON Schema (checked against its own $schema draft, else the latest), or None."""
    import jsonschema
    if not isinstance(schema, (dict, bool)):
        return f"a JSON Schema is an object, got {type(schema).__name__}"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message}"
    return None


# ------------------------------------------------------------------------------------------------ the metrics

def exact(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def contains(answer: str, reference: str) -> float:
    # casefold: the Unicode-aware lower(), so "STRASSE" finds "straße"
    return float(reference.strip().casefold() in answer.casefold())


def regex(answer: str, pattern: str | re.Pattern) -> float:
    return float(re.search(pattern, answer) is not None)


def json_valid(answer: str, schema: dict | bool | None = None) -> float:
    """1 when the answer (stripped) is a JSON text, and an instance of `schema` when one is given."""
    try:
        value = json.loads(answer.strip())
    except ValueError:  # JSONDecodeError, or a number over Python's digit limit
        return 0.0
    if schema is None:
        return 1.0
    return float(_validator(json.dumps(schema, sort_keys=True)).is_valid(value))


@lru_cache(maxsize=64)
def _validator(schema_text: str):
    """A validator per schema, built once (an item's schema repeats across items): keyed by its JSON text."""
    import jsonschema
    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def rouge_l(answer: str, reference: str) -> float:
    return _rouge().score(reference, answer)["rougeL"].fmeasure  # score(target, prediction)


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"])


def chrf(answer: str, reference: str) -> float:
    return _chrf().sentence_score(answer, [reference]).score


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF
    return CHRF()


def tool_call(answer: str, expected: dict | None) -> float:
    """1 for exactly the expected call (name and arguments, as tool_call_score's "exact"); for expected None,
    1 when the answer calls no tool."""
    if expected is None:
        return float("<tool_call>" not in answer)
    return float(score_call(answer, expected)[2])


# ---------------------------------------------------------------------------------------- on held-out items

def reference_text(reference) -> str:
    """A reference as the text metrics compare: a structured one (an expected call) as its JSON."""
    if isinstance(reference, str):
        return reference
    return "" if reference is None else json.dumps(reference, ensure_ascii=False)


def expected_call(reference) -> dict | None:
    """The tool_call metric's expected call: the reference itself ({name, arguments}, or None for no tool),
    or the call in a reference text's <tool_call> (a training row's last assistant turn); ValueError when it
    is neither."""
    if reference is None:
        return None
    if isinstance(reference, str):
        m = CALL.search(reference)
        if m is None:
            return None  # an answer in words: no tool should be called
        reference = json.loads(m.group(1))  # ValueError when the call is not JSON
    if not (isinstance(reference, dict) and isinstance(reference.get("name"), str)
            and isinstance(reference.get("arguments"), dict)):
        raise ValueError("expected {name, arguments}, or null when no tool should be called")
    return reference


def score(name: str, answer: str, reference, options: MetricOptions, schema: dict | None = None) -> float:
    """Metric `name` of one answer; `schema` is the item's own (it wins over evaluation.json_schema)."""
    if name == "tool_call":
        return tool_call(answer, expected_call(reference))
    if name == "json":
        return json_valid(answer, schema if schema is not None else options.schema)
    if name == "regex":
        return regex(answer, options.pattern or reference_text(reference))
    return {"exact": exact, "contains": contains, "rouge_l": rouge_l, "chrf": chrf}[name](
        answer, reference_text(reference))
