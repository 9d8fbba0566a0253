"""Blind A/B review, without the screen (engine/review): Wilson intervals, the tally through the hidden
sides, sessions saved and resumed, prompts read from any data shape, and labelled answers appended durably
to a dataset that validates and trains (SFT and KTO)."""

import json
import os

import pytest

from engine.data import validate_dataset
from engine.review import labels as labels_module
from engine.review.labels import LabelError, append_labelled
from engine.review.prompts import read_prompts
from engine.review.session import BASE, ReviewSession, SessionError, Tally, latest_unfinished
from engine.review.stats import wilson_interval, win_rate
from helpers import ROOT, addition_chats, tiny_config, write_jsonl

GREEDY = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}


# ------------------------------------------------------------------------------------------------ statistics

@pytest.mark.parametrize("wins, n, expected", [
    (8, 10, (0.490, 0.943)),  # statsmodels' proportion_confint(8, 10, method="wilson")
    (0, 10, (0.0, 0.278)),
    (10, 10, (0.722, 1.0)),
    (50, 100, (0.404, 0.596)),
    (1, 1, (0.207, 1.0)),
])
def test_wilson_interval_matches_known_values(wins, n, expected):
    lo, hi = wilson_interval(wins, n)
    assert lo == pytest.approx(expected[0], abs=5e-4) and hi == pytest.approx(expected[1], abs=5e-4)


def test_wilson_interval_is_symmetric_and_uninformative_without_data():
    lo, hi = wilson_interval(8, 10)
    assert wilson_interval(2, 10) == pytest.approx((1 - hi, 1 - lo))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(2.5, 5)[0] < 0.5 < wilson_interval(2.5, 5)[1]  # half wins (ties) are fine
    assert win_rate(3, 1) == 0.75 and win_rate(0, 0) is None


# ------------------------------------------------------------------------------------------------ sessions

def session_with(tmp_path, n: int, seed: int = 3) -> ReviewSession:
    session = ReviewSession.new(tmp_path / "review", [BASE, "runs/a/adapter"], GREEDY, "typed",
                                str(tmp_path / "labels.jsonl"), seed=seed)
    for i in range(n):
        index = session.add_item([{"role": "user", "content": f"{i}+1"}])
        session.answers[index] = [f"base says {i}", f"adapter says {i + 1}"]
    return session


def test_sides_are_seeded_per_session_and_both_occur(tmp_path):
    a, b = session_with(tmp_path, 40, seed=5), session_with(tmp_path, 40, seed=5)
    assert a.sides == b.sides and set(a.sides) == {0, 1}
    assert session_with(tmp_path, 40, seed=6).sides != a.sides
    index = a.sides.index(1)  # the adapter (source 1) on the left
    assert a.source_on(index, "left") == 1 and a.answer_on(index, "left") == f"adapter says {index + 1}"


def test_tally_follows_the_hidden_sides(tmp_path):
    session = session_with(tmp_path, 6)
    adapter_left = [i for i in range(6) if session.sides[i] == 1]
    for i in range(4):  # the adapter wins the first four, whichever side it was on
        session.judge(i, "left" if i in adapter_left else "right")
    session.judge(4, "tie")
    session.judge(5, "both-bad")
    base, adapter = session.tally()
    assert (adapter.wins, adapter.losses, adapter.ties, adapter.both_bad) == (4, 0, 1, 1)
    assert (base.wins, base.losses, base.ties, base.both_bad) == (0, 4, 1, 1)
    assert adapter.win_rate() == 1.0 and adapter.interval() == pytest.approx(wilson_interval(4, 4))
    assert adapter.win_rate_with_ties() == pytest.approx(4.5 / 5)
    assert base.win_rate_with_ties() == pytest.approx(0.5 / 5)
    assert session.finished and session.next_unjudged() is None


def test_a_tally_line_says_counts_rate_interval_and_ties():
    line = Tally("base", 3, 1, 1, 0).describe("base")
    assert line == "base: 3W 1L 1T 0 both bad · win 75% [30%–95%] · ties ½: 70%"
    assert Tally("x").describe("x") == "x: 0W 0L 0T 0 both bad"  # no rate before a decided pair


def test_next_unjudged_wraps_around(tmp_path):
    session = session_with(tmp_path, 4)
    session.judge(0, "tie")
    session.judge(3, "tie")
    assert session.next_unjudged(3) == 1 and session.next_unjudged(2) == 2


def test_a_session_round_trips_and_the_newest_unfinished_one_resumes(tmp_path):
    done = session_with(tmp_path, 2)
    done.judge(0, "left")
    done.judge(1, "tie")
    done.save()
    session = session_with(tmp_path, 3)
    session.id, session.path = "later", tmp_path / "review" / "session-later.json"
    session.judge(1, "right")
    session.add_label(1, 0, "left", "desirable", "x.jsonl")
    session.save()
    (tmp_path / "review" / "session-broken.json").write_text("{not json")  # passed over
    back = ReviewSession.load(session.path)
    assert back == session and back.to_dict() == json.loads(session.path.read_text())
    assert json.loads(session.path.read_text())["tally"][1]["wins"] == 1 - session.sides[1]  # for readers
    assert latest_unfinished(tmp_path / "review") == session  # `done` is finished: never resumed
    assert back.label_of(1, 0) == "desirable" and back.label_of(1, 1) is None
    with pytest.raises(SessionError):
        ReviewSession.load(tmp_path / "review" / "session-broken.json")
    assert not list((tmp_path / "review").glob(".*.tmp"))  # saved atomically: no temp file left


def test_a_session_needs_two_different_sources(tmp_path):
    with pytest.raises(SessionError):
        ReviewSession.new(tmp_path, [BASE, BASE], GREEDY, "typed", "labels.jsonl")


# ------------------------------------------------------------------------------------------------ prompts

def test_held_out_prompts_are_their_messages():
    items = read_prompts(ROOT / "data" / "heldout.jsonl")
    first = json.loads((ROOT / "data" / "heldout.jsonl").read_text().splitlines()[0])
    assert len(items) == 160 and items[0] == {"messages": first["messages"], "origin": "line 1"}


def test_prompts_from_other_shapes(tmp_path):
    rows = [{"prompt": "hi"}, {"conversations": [{"from": "human", "value": "q"}]},
            {"instruction": "do", "input": "x"}, {"text": "no prompt here"},
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "old answer"}]}]
    items = read_prompts(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [i["messages"][-1]["content"] for i in items] == ["hi", "q", "do\nx", "a", "u"]
    assert all(len(i["messages"]) == 1 for i in items)


# ------------------------------------------------------------------------------------------------ labels

PROMPT = [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+3"}]


def test_a_label_is_a_seed_row(tmp_path):
    path = tmp_path / "review" / "labels.jsonl"
    assert append_labelled(path, PROMPT, "5", "desirable") == 1
    assert append_labelled(path, PROMPT, "6", "undesirable") == 2
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"conversations": PROMPT + [{"role": "assistant", "content": "5"}], "label": "desirable"}
    assert rows[1]["label"] == "undesirable"
    report, _ = validate_dataset(path)
    assert report.valid == 2 and report.error_lines == 0 and dict(report.labels) == {"desirable": 1, "undesirable": 1}


def test_a_row_that_would_not_validate_is_not_written(tmp_path):
    path = tmp_path / "labels.jsonl"
    with pytest.raises(LabelError):
        append_labelled(path, PROMPT, "   ", "desirable")  # an empty answer is a bad row
    with pytest.raises(LabelError):
        append_labelled(path, PROMPT, "5", "great")
    assert not path.exists()


def test_a_crash_mid_write_leaves_the_earlier_lines_intact(tmp_path, monkeypatch):
    path = tmp_path / "labels.jsonl"
    append_labelled(path, PROMPT, "5", "desirable")
    append_labelled(path, PROMPT, "6", "undesirable")
    before = path.read_bytes()
    real_write = os.write

    def half_then_die(fd, data):  # the process dies half-way through the third line
        real_write(fd, data[:len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(labels_module.os, "write", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        append_labelled(path, PROMPT, "7", "desirable")
    monkeypatch.undo()
    assert path.read_bytes() == before  # the half line was cut back off

    with open(path, "ab") as fh:  # a power cut leaves half a line that nothing cut back
        fh.write(b'{"conversations": [{"role": "us')
    assert append_labelled(path, PROMPT, "8", "desirable") == 4
    lines = path.read_bytes().splitlines()
    assert b"\n".join(lines[:2]) + b"\n" == before and lines[3].endswith(b'"label": "desirable"}')
    report, _ = validate_dataset(path)
    assert report.valid == 3 and [i.line for i in report.issues] == [3]  # only the torn line is bad


@pytest.mark.parametrize("method", ["sft", "kto"])
def test_a_labelled_file_trains(tmp_path, method, embedded_dir):
    from engine.train.run import TrainingRun
    path = tmp_path / "review" / "labels.jsonl"
    for i, chat in enumerate(addition_chats(12)):
        prompt, answer = chat["messages"][:-1], chat["messages"][-1]["content"]
        append_labelled(path, prompt, answer if i % 3 else "no idea", "undesirable" if i % 3 == 0 else "desirable")
    cfg = tiny_config(tmp_path, data={"path": str(path)}, training={"iterations": 2, "method": method})
    result = TrainingRun(cfg, []).run()
    assert result.status == "finished", result.message
    assert (tmp_path / "runs" / "run" / "adapter" / "adapters.safetensors").is_file()
