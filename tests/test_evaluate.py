"""The held-out metrics: tool calls (with prompts that need no tool) and faithful final answers."""

import json

import pytest

from engine.data import DatasetError
from engine.evaluate.answers import answer_score, load_answer_items, numbers, score_answer
from engine.evaluate.tool_calls import ToolCallScore, load_heldout, tool_call_score
from helpers import ROOT, write_jsonl

PROMPT = [{"role": "user", "content": "What is the capital of Portugal?"}]
WEATHER = {"messages": [{"role": "user", "content": "Weather in Lisbon, in celsius?"},
                        {"role": "assistant", "content": '<tool_call>{"name": "get_weather"}</tool_call>'},
                        {"role": "tool", "content": '{"city": "Lisbon", "temperature": 17, "condition": "fog"}'}],
           "facts": ["17", "Lisbon", "fog"], "tool": "get_weather"}


# ------------------------------------------------------------------------------------------ tool calls

def test_heldout_accepts_expected_null(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [
        {"messages": PROMPT, "expected": {"name": "get_weather", "arguments": {"city": "Lisbon"}}},
        {"messages": PROMPT, "expected": None}])
    items = load_heldout(path)
    assert [i["expected"] is None for i in items] == [False, True]


@pytest.mark.parametrize("record", [
    {"messages": PROMPT},  # no "expected" at all: a typo, not "no tool"
    {"messages": PROMPT, "expected": "none"},
    {"messages": [], "expected": None},
    "{oops",
])
def test_heldout_bad_line_is_one_line_naming_file_and_line(tmp_path, record):
    path = write_jsonl(tmp_path / "h.jsonl", [{"messages": PROMPT, "expected": None}, record])
    with pytest.raises(DatasetError) as exc:
        load_heldout(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:line 2: ") and "\n" not in message


def test_tool_call_score_keeps_tool_rates_apart_from_no_tool():
    assert ToolCallScore().to_dict() == {"prompts": 0, "well_formed": 0.0, "right_tool": 0.0, "exact": 0.0,
                                         "no_tool_prompts": 0, "no_tool": None}
    score = ToolCallScore(prompts=4, well_formed=4, right_tool=2, exact=1, no_tool_prompts=2, no_tool_correct=1)
    assert score.to_dict() == {"prompts": 4, "well_formed": 1.0, "right_tool": 0.5, "exact": 0.25,
                               "no_tool_prompts": 2, "no_tool": 0.5}


# ------------------------------------------------------------------------------------------ final answers

def test_numbers_are_read_as_written():
    assert numbers("It is -5°C on 2026-03-05, 1,234.50 USD") == ["-5", "2026", "03", "05", "1234.50"]


@pytest.mark.parametrize("text,faithful,made_up", [
    ("It is 17°C and fog in Lisbon.", True, False),
    ("In lisbon it is 17.0 degrees, FOG.", True, False),
    ("It is 170°C and fog in Lisbon.", False, True),  # 170 is not 17
    ("It is foggy in Lisbon.", False, False),  # the temperature is missing; nothing made up
    ("It is 17°C and fog in Lisbon, 22 tomorrow.", True, True),  # faithful, and a number from nowhere
])
def test_score_answer(text, faithful, made_up):
    assert score_answer(text, WEATHER) == (faithful, made_up)


def test_score_answer_allows_rounding_and_numbers_from_the_user():
    item = {"messages": [{"role": "user", "content": "Convert 500 JPY to EUR."},
                         {"role": "tool", "content": '{"amount": 500, "result": 3414.857}'}],
            "facts": ["3414.857"]}
    assert score_answer("500 JPY is 3,414.857 EUR.", item) == (True, False)
    assert score_answer("500 JPY is about 3414.86 EUR.", item) == (True, False)  # rounded, not made up
    assert score_answer("500 JPY is 3415 EUR.", item) == (False, True)


def test_load_answer_items_and_a_bad_line(tmp_path):
    good = WEATHER | {"id": "a0000"}
    assert load_answer_items(write_jsonl(tmp_path / "a.jsonl", [good, good]), limit=1) == [good]
    for bad in ({"messages": WEATHER["messages"], "facts": []}, {"facts": ["17"]}, "[1, 2]", "{oops"):
        path = write_jsonl(tmp_path / "a.jsonl", [good, bad])
        with pytest.raises(DatasetError) as exc:
            load_answer_items(path)
        message = str(exc.value)
        assert message.startswith(f"{path}:line 2: ") and "\n" not in message
    with pytest.raises(DatasetError, match="no such file|No such file"):
        load_answer_items(tmp_path / "missing.jsonl")


def test_the_committed_heldout_files_load():
    heldout = load_heldout(ROOT / "data" / "heldout.jsonl")
    assert sum(i["expected"] is None for i in heldout) > 0 and sum(i["expected"] is not None for i in heldout) > 0
    answers = load_answer_items(ROOT / "data" / "heldout_answers.jsonl")
    assert answers and all(i["messages"][-1]["role"] == "tool" for i in answers)
    # a faithful answer is possible: every fact is in the call or its result
    assert all(f in i["messages"][-2]["content"] + i["messages"][-1]["content"] for i in answers for f in i["facts"])


# ------------------------------------------------------------------------------------------ with the model

def test_scores_with_the_embedded_model(loaded_model):
    model, tokenizer, _ = loaded_model
    heldout = load_heldout(ROOT / "data" / "heldout.jsonl")
    items = [i for i in heldout if i["expected"]][:2] + [i for i in heldout if i["expected"] is None][:2]
    calls = tool_call_score(model, tokenizer, items, max_tokens=24)
    assert calls.prompts == 2 and calls.no_tool_prompts == 2
    rates = calls.to_dict()
    assert all(0.0 <= rates[k] <= 1.0 for k in ("well_formed", "right_tool", "exact", "no_tool"))
    answers = answer_score(model, tokenizer, load_answer_items(ROOT / "data" / "heldout_answers.jsonl", 2),
                           max_tokens=24)
    assert answers.prompts == 2 and len(answers.examples) == 2
    assert all(0.0 <= v <= 1.0 for k, v in answers.to_dict().items() if k != "prompts")
    json.dumps(rates | answers.to_dict())  # the report writes them as JSON
