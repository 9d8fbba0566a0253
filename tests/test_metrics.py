"""Held-out evaluation for any dataset: the metrics (each the library's own number), the held-out reader
on every container, batched greedy answers against one-by-one ones, and the "evaluation" block that
`train --eval-only` and the end of a run write into report.json."""

import json

import pytest

from engine.config.loading import from_dict
from engine.config.schema import ConfigError, EvaluationConfig
from engine.config.validation import validate
from engine.data import DatasetError
from engine.evaluate import metrics
from engine.evaluate.heldout import load_items
from engine.evaluate.metrics import MetricOptions, score
from engine.evaluate.tool_calls import score_call
from helpers import ROOT, cli, tiny_config, write_jsonl

PAIRS = [  # (answer, reference)
    ("The cat sat on the mat.", "The cat is on the mat."),
    ("the quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."),
    ("Lisbon is the capital of Portugal.", "Lisbon"),
    ("", "Lisbon"),  # an empty answer
    ("Die Straße ist naß, 17 °C.", "Die Strasse ist nass, 17 °C."),  # non-ASCII Latin
    ("東京は日本の首都です。", "日本の首都は東京です。"),  # another script
    ("😀 ok", "😀 ok"),
]


# ------------------------------------------------------------------------------------- the library's numbers

@pytest.mark.parametrize("answer,reference", PAIRS)
def test_rouge_l_is_rouge_scores_f_measure(answer, reference):
    from rouge_score import rouge_scorer
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer)["rougeL"].fmeasure
    assert metrics.rouge_l(answer, reference) == expected


@pytest.mark.parametrize("answer,reference", PAIRS)
def test_chrf_is_sacrebleus_sentence_chrf(answer, reference):
    import sacrebleu
    assert metrics.chrf(answer, reference) == sacrebleu.sentence_chrf(answer, [reference]).score


def test_known_values_and_edges():
    # LCS "the cat on the mat" is 5 of 6 tokens each way
    assert metrics.rouge_l("The cat sat on the mat.", "The cat is on the mat.") == pytest.approx(5 / 6)
    assert metrics.chrf("The cat is on the mat.", "The cat is on the mat.") == 100.0
    assert metrics.rouge_l("", "Lisbon") == 0.0 and metrics.chrf("", "Lisbon") == 0.0
    # rouge-score's tokenizer keeps a-z0-9 only: identical Japanese scores 0 (the README says: use chrf)
    assert metrics.rouge_l("東京", "東京") == 0.0 and metrics.chrf("東京", "東京") == 100.0


def test_exact_contains_regex():
    assert metrics.exact("  42\n", "42") == 1.0 and metrics.exact("42.", "42") == 0.0
    assert metrics.contains("The answer: LISBON.", "lisbon") == 1.0
    assert metrics.contains("Die STRASSE", "straße") == 1.0  # case-insensitive, Unicode's way
    assert metrics.contains("", "Lisbon") == 0.0
    assert metrics.regex("It costs 12.50 EUR", r"\d+\.\d{2} EUR") == 1.0
    assert metrics.regex("It costs 12 EUR", r"\d+\.\d{2} EUR") == 0.0
    assert metrics.regex("", r"^$") == 1.0


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["city"]}


@pytest.mark.parametrize("answer,schema,expected", [
    ('{"city": "Lisbon"}', None, 1.0),
    (' [1, 2]\n', None, 1.0),
    ("Sure! {\"city\": 1}", None, 0.0),
    ("", None, 0.0),
    ('{"city": "Lisbon", "n": 3}', SCHEMA, 1.0),
    ('{"n": 3}', SCHEMA, 0.0),  # required city missing
    ('{"city": "Lisbon", "n": "3"}', SCHEMA, 0.0),  # wrong type
    ('"just a string"', SCHEMA, 0.0),
    ("not json", SCHEMA, 0.0),
])
def test_json_and_schema(answer, schema, expected):
    assert metrics.json_valid(answer, schema) == expected


@pytest.mark.parametrize("answer", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "lisbon", "unit": "Celsius"}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Porto"}}</tool_call>',
    '<tool_call>{"name": "convert_currency", "arguments": {}}</tool_call>',
    "<tool_call>not json</tool_call>",
    "It is sunny.",
])
def test_tool_call_is_todays_exact_call(answer):
    expected = {"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}
    assert metrics.tool_call(answer, expected) == float(score_call(answer, expected)[2])
    assert metrics.tool_call(answer, None) == float("<tool_call>" not in answer)
    # a training row's answer text holds the call: the same expectation
    text = f"<tool_call>{json.dumps(expected)}</tool_call>"
    assert score("tool_call", answer, text, MetricOptions()) == metrics.tool_call(answer, expected)
    assert score("tool_call", answer, "Paris is the capital.", MetricOptions()) == metrics.tool_call(answer, None)


def test_score_options_and_item_schema():
    import re
    options = MetricOptions(pattern=re.compile(r"^\d+$"), schema={"type": "array"})
    assert score("regex", "42", "ignored", options) == 1.0
    assert score("regex", "42", r"^4", MetricOptions()) == 1.0  # without a configured pattern: the reference
    assert score("json", "[1]", None, options) == 1.0 and score("json", "{}", None, options) == 0.0
    assert score("json", "{}", None, options, schema={"type": "object"}) == 1.0  # the item's own schema wins
    assert score("exact", '{"name": "f", "arguments": {}}', {"name": "f", "arguments": {}}, options) == 1.0


# ------------------------------------------------------------------------------------------------ the config

def config_errors(evaluation: dict) -> dict[str, str]:
    cfg, issues = from_dict({"evaluation": evaluation})
    return {i.field: i.message for i in issues + validate(cfg) if i.severity == "error"}


def test_config_metrics_are_checked():
    assert config_errors({"metrics": ["exact", "rouge_l", "chrf", "tool_call"]}) == {}
    assert config_errors({"metrics": "exact, chrf"}) == {}  # the form's comma-separated text
    message = config_errors({"metrics": ["exact", "rouge"]})["evaluation.metrics"]
    assert "'rouge'" in message and "did you mean 'rouge_l'" in message
    assert "exact, contains, regex, json, rouge_l, chrf, tool_call" in message
    assert "empty" in config_errors({"metrics": []})["evaluation.metrics"]
    assert config_errors({"metrics": [], "heldout_path": ""}) == {}
    assert "not a regular expression" in config_errors({"metrics": ["regex"], "regex": "(unclosed"})["evaluation.regex"]
    assert "does not parse" in config_errors({"metrics": ["json"], "json_schema": "{oops"})["evaluation.json_schema"]


def test_schema_option_from_a_file_or_inline(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    assert MetricOptions.from_config(EvaluationConfig(metrics=["json"], json_schema=str(tmp_path / "s.json"))).schema == SCHEMA
    assert MetricOptions.from_config(EvaluationConfig(metrics=["json"], json_schema=json.dumps(SCHEMA))).schema == SCHEMA
    for bad, needle in ((str(tmp_path / "none.json"), "No such file"), ('{"type": 5}', "not a valid JSON Schema")):
        with pytest.raises(ConfigError, match=needle) as exc:
            MetricOptions.from_config(EvaluationConfig(metrics=["json"], json_schema=bad))
        assert exc.value.issues[0].field == "evaluation.json_schema"


# ------------------------------------------------------------------------------------------ the held-out reader

ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2"},
                  {"role": "assistant", "content": "4"}]},
    {"prompt": "3+3", "completion": "6"},
    {"instruction": "Add the numbers.", "input": "4 and 4", "output": "8"},
    {"conversations": [{"from": "human", "value": "5+5"}], "reference": "10"},
    {"messages": [{"role": "user", "content": "6+6"}, {"role": "assistant", "content": "old"}], "expected": "12"},
]


def check_rows(items):
    assert [i.reference for i in items] == ["4", "6", "8", "10", "12"]
    assert items[0].messages == ROWS[0]["messages"][:2]
    assert items[1].messages == [{"role": "user", "content": "3+3"}]
    assert items[2].messages == [{"role": "user", "content": "Add the numbers.\n4 and 4"}]
    assert items[3].messages == [{"role": "user", "content": "5+5"}]
    assert items[4].messages == [{"role": "user", "content": "6+6"}]  # the reference replaces the answer


def test_reader_jsonl_and_json(tmp_path):
    check_rows(load_items(write_jsonl(tmp_path / "h.jsonl", ROWS), metrics=["exact"]))
    (tmp_path / "h.json").write_text(json.dumps(ROWS))
    check_rows(load_items(tmp_path / "h.json", metrics=["exact"]))
    assert len(load_items(tmp_path / "h.json", limit=2)) == 2


def test_reader_csv_and_parquet(tmp_path):
    import pandas as pd
    rows = [{"question": "3+3", "answer": "6"}, {"question": "7+1", "answer": "8"}]
    pd.DataFrame(rows).to_csv(tmp_path / "h.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "h.parquet")
    for name in ("h.csv", "h.parquet"):
        items = load_items(tmp_path / name, {"prompt": "question", "completion": "answer"}, metrics=["exact"])
        assert [(i.messages[-1]["content"], i.reference) for i in items] == [("3+3", "6"), ("7+1", "8")]
    # tool-call items as a table: messages and the expected call as JSON text, "null" for no tool
    calls = [{"messages": json.dumps([{"role": "user", "content": "Weather in Oslo?"}]),
              "expected": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
             {"messages": json.dumps([{"role": "user", "content": "Hi"}]), "expected": "null"}]
    pd.DataFrame(calls).to_csv(tmp_path / "calls.csv", index=False)
    pd.DataFrame(calls).to_parquet(tmp_path / "calls.parquet")
    for name in ("calls.csv", "calls.parquet"):
        items = load_items(tmp_path / name, metrics=["tool_call"])
        assert [i.reference for i in items] == [{"name": "get_weather", "arguments": {"city": "Oslo"}}, None]


def test_the_committed_heldout_file_keeps_working():
    items = load_items(ROOT / "data" / "heldout.jsonl", metrics=["tool_call"])
    assert len(items) == 160 and items[0].id == "h0000"
    assert sum(i.reference is None for i in items) == 40
    assert items[0].messages[-1]["role"] == "user" and items[0].reference["name"] == "get_weather"


@pytest.mark.parametrize("record,metric,needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "exact", "line 2: a held-out prompt needs"),
    ({"expected": {"name": "f", "arguments": {}}}, "tool_call", "line 2: a held-out prompt needs"),
    ({"messages": [{"role": "user", "content": "hi"}], "expected": {"name": "f"}}, "tool_call", "for the tool_call"),
    ({"prompt": "hi", "reference": " "}, "rouge_l", "the reference is empty"),
    ({"prompt": "hi", "reference": "(unclosed"}, "regex", "does not compile"),
    ({"prompt": "hi", "reference": "{}", "schema": {"type": 5}}, "json", "schema: not a valid JSON Schema"),
    ({"text": "plain text has no reference"}, "exact", "a held-out prompt needs"),
    ("{oops", "exact", "line 2: invalid JSON"),
    ("[1]", "exact", "line 2: a held-out prompt needs"),
])
def test_reader_names_file_and_row(tmp_path, record, metric, needle):
    path = write_jsonl(tmp_path / "h.jsonl", [ROWS[1], record])
    with pytest.raises(DatasetError) as exc:
        load_items(path, metrics=[metric])
    assert str(path) in str(exc.value) and needle in str(exc.value) and "\n" not in str(exc.value)


def test_reader_unreadable_sources(tmp_path):
    with pytest.raises(DatasetError, match="evaluation.heldout_path: .*no such file"):
        load_items(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="evaluation.heldout_path: .*directory with no dataset"):
        load_items(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ with the model

def test_batched_answers_equal_one_by_one_greedy_answers(loaded_model):
    from engine.evaluate.batched import batched_answers
    from engine.generate.reply import GenerationSettings, reply
    model, tokenizer, _ = loaded_model
    items = load_items(ROOT / "data" / "heldout.jsonl", metrics=["tool_call"])
    items = items[:2] + items[-2:]  # tool prompts and no-tool prompts: different lengths, so left padding
    one_by_one = [reply(model, tokenizer, i.messages, GenerationSettings(max_tokens=20)) for i in items]
    for batch in (4, 3):  # one batch; a batch of 3 and one of 1
        assert batched_answers(model, tokenizer, [(i.messages, i.tools) for i in items], 20, batch) == one_by_one
    assert batched_answers(model, tokenizer, [(i.messages, None) for i in items], 20, 2, lambda: True) is None


def test_shared_prefixes_are_read_once(loaded_model):
    from engine.evaluate.batched import MIN_SHARED, shared_prefixes
    model = loaded_model[0]
    head = list(range(100, 100 + MIN_SHARED + 4))
    chunk = [head + [7], head + [8, 9], [5, 6, 7]]  # sorted: two share `head`, the third nothing
    caches, rests = shared_prefixes(model, chunk)
    assert rests == [[7], [8, 9], [7]]  # a prompt alone: all but its last token is in its cache
    assert caches[0] is caches[1] and caches[2] is not caches[0]
    assert caches[0][0].offset == len(head) and caches[2][0].offset == 2


def test_eval_only_and_end_of_run_write_the_evaluation_block(tmp_path, capsys, embedded_dir):
    from engine.config.loading import save_config
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": f"{i}+1", "completion": str(i + 1)}
                                                       for i in range(3)])
    evaluation = {"heldout_path": str(heldout), "metrics": ["exact", "contains", "rouge_l", "chrf"],
                  "heldout_limit": 2, "heldout_batch_size": 2}
    cfg = tiny_config(tmp_path, evaluation=evaluation)
    save_config(cfg, tmp_path / "c.yaml")
    code, out, err = cli(capsys, "--config", tmp_path / "c.yaml", "train")
    assert code == 0, err
    assert "held-out evaluation (2 items of" in out and "rouge_l" in out
    run_dir = tmp_path / "runs" / "run"
    block = json.loads((run_dir / "report.json").read_text())["evaluation"]
    assert block["items"] == 2 and block["heldout"] == str(heldout) and len(block["examples"]) == 2
    assert set(block["metrics"]) == {"exact", "contains", "rouge_l", "chrf"}
    assert all(set(v) == {"base", "tuned"} for v in block["metrics"].values())
    assert block["examples"][0]["reference"] == "1" and block["examples"][0]["prompt"] == "0+1"
    assert block["adapter"] == str(run_dir / "adapter")

    cfg.evaluation.metrics, cfg.evaluation.heldout_limit = ["exact", "chrf"], 3
    save_config(cfg, tmp_path / "c.yaml")
    code, out, err = cli(capsys, "--config", tmp_path / "c.yaml", "train", "--eval-only", "--resume",
                         run_dir / "checkpoints" / "step_000004")
    assert code == 0, err
    header, rule, *rows = out.strip().splitlines()
    assert header.split() == ["metric", "|", "base", "|", "tuned", "|", "delta"]
    assert [r.split()[0] for r in rows] == ["val_loss", "perplexity", "exact", "chrf"]
    block = json.loads((run_dir / "report.json").read_text())["evaluation"]
    assert block["items"] == 3 and set(block["metrics"]) == {"exact", "chrf"}
    assert block["adapter"] == str(run_dir / "checkpoints" / "step_000004")
    exact = next(r for r in rows if r.startswith("exact")).split("|")
    assert float(exact[1]) == pytest.approx(block["metrics"]["exact"]["base"], abs=1e-4)
    assert float(exact[2]) == pytest.approx(block["metrics"]["exact"]["tuned"], abs=1e-4)
