"""The Review screen (F6): a blind A/B review of the base model against a freshly trained adapter on typed
prompts, through the app's real engine thread, judged and labelled with keys, then resumed by a new app;
and snapshots of the screen built from a saved session (no generation) at 120x40 and 80x24."""

import json
from pathlib import Path

import pytest

from engine.data import validate_dataset
from engine.review.session import BASE, ReviewSession, session_files
from helpers import tiny_config
from tui.app import LoraTuiApp
from tui.screens.review_screen import AnswerPanel, ReviewScreen
from tui_helpers import wait_for

SIZE = (120, 40)
PROMPTS = ["12", "What is 2+3?", "Name a colour."]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, embedded_dir) -> Path:
    """A real adapter: two steps of training on the embedded model."""
    from engine.train.run import TrainingRun
    root = tmp_path_factory.mktemp("review-run")
    result = TrainingRun(tiny_config(root, training={"iterations": 2}), []).run()
    assert result.status == "finished", result.message
    return root / "runs" / "run" / "adapter"


def review_app(output_dir: Path) -> LoraTuiApp:
    app = LoraTuiApp(None)
    app.cfg.output.dir = str(output_dir)
    app.cfg.evaluation.max_tokens = 4  # short answers: the flow is the subject, not the text
    return app


async def open_review(pilot) -> ReviewScreen:
    await pilot.press("f6")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ReviewScreen), timeout=30, what="the review screen")
    await pilot.pause()
    return pilot.app.screen


def titles(screen) -> list[str]:
    return [str(panel.border_title) for panel in screen.query(AnswerPanel)]


async def test_review_judge_label_quit_and_resume(adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config.yaml here: the built-in defaults
    runs = adapter.parent.parent
    app = review_app(runs)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_review(pilot)
        screen.query_one("#review-first").value = BASE
        screen.query_one("#review-second").value = str(adapter)
        screen.query_one("#review-prompts").value = "typed"
        await pilot.click("#review-start")
        await pilot.pause()
        session = screen.session
        assert session is not None and session.sources == [BASE, str(adapter)] and not session.items
        assert app.focused.id == "review-typed"
        await pilot.press(*PROMPTS[0], "enter")  # digits typed into the box are text, not judgements
        for prompt in PROMPTS[1:]:
            screen.query_one("#review-typed").value = prompt
            await pilot.press("enter")
        assert [item["messages"] for item in session.items] == [[{"role": "user", "content": p}] for p in PROMPTS]
        assert session.judged == 0
        await wait_for(pilot, lambda: all(session.answered(i) for i in range(3)), timeout=60, what="six answers")
        await pilot.pause()
        assert titles(screen) == ["A (left)", "B (right)"]  # blind until judged

        await pilot.press("escape")  # to the answers
        assert app.focused.id == "answer-left"
        await pilot.press("1")
        assert session.verdict(0) == "left"
        winner = session.sources[session.sides[0]]
        assert titles(screen)[0] == f"A (left): {'base model' if winner == BASE else 'run/adapter'}"
        await pilot.press("n", "2", "n")
        assert session.verdict(1) == "right" and screen.current == 2
        await pilot.press("tab", "d")  # label the right answer of the third prompt
        assert app.focused.id == "answer-right"
        right = session.source_on(2, "right")
        assert session.label_of(2, right) == "desirable" and session.verdict(2) is None
        saved = ReviewSession.load(session.path)
        assert saved.judgements == session.judgements and saved.answers == session.answers
        judgements, answers, sides = session.judgements, session.answers, session.sides
        await pilot.press("ctrl+q")

    labels = runs / "review" / "labels.jsonl"
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert rows == [{"conversations": [{"role": "user", "content": PROMPTS[2]},
                                       {"role": "assistant", "content": answers[2][right]}],
                     "label": "desirable"}]
    report, _ = validate_dataset(labels)
    assert report.valid == 1 and report.error_lines == 0

    again = review_app(runs)
    async with again.run_test(size=SIZE) as pilot:
        screen = await open_review(pilot)
        resumed = screen.session
        assert resumed is not None and resumed.id == session.id and resumed.path == session.path
        assert (resumed.judgements, resumed.answers, resumed.sides) == (judgements, answers, sides)
        assert screen.current == 2 and screen.in_flight is None  # nothing asked again
        await pilot.press("b")
        assert resumed.finished
        await pilot.press("ctrl+q")
    assert ReviewSession.load(session.path).verdict(2) == "both-bad"
    assert len(session_files(runs / "review")) == 1


# ------------------------------------------------------------------------------------------------ snapshots

def saved_session(root: Path) -> None:
    """A session of three answered prompts, the first judged, saved where the app looks (relative paths, so
    that nothing in the picture depends on the temp folder)."""
    review = root / "runs" / "review"
    session = ReviewSession("20260101-120000", [BASE, "runs/run/adapter"], 7,
                            {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}, "typed",
                            "runs/review/labels.jsonl", created=0.0, path=review / "session-20260101-120000.json")
    for prompt, base, tuned in [
            ("What is 2+3?", "5", "2+3 is 5."),
            ("Is it raining in Zurich? Give me celsius.", "I cannot check the weather.",
             '<tool_call>{"name": "get_weather", "arguments": {"city": "Zurich", "unit": "celsius"}}</tool_call>'),
            ("Name a primary colour.", "Red.", "Blue is one.")]:
        index = session.add_item([{"role": "user", "content": prompt}])
        session.answers[index] = [base, tuned]
    session.judge(0, "left")
    session.judgements[0]["at"] = 0.0
    session.save()


@pytest.fixture()
def snapshot_app(tmp_path, monkeypatch, model_cache):
    monkeypatch.chdir(tmp_path)
    saved_session(tmp_path)
    app = LoraTuiApp(None)
    app.cfg.output.dir = "runs"
    return app


def review_then(*keys):
    async def run(pilot):
        await open_review(pilot)
        for key in keys:
            await pilot.press(key)
        await pilot.pause()
    return run


def test_review_screen_judged_pair_at_120x40(snap_compare, snapshot_app):
    """The first prompt, judged: both sources named, the winner's border heavy."""
    assert snap_compare(snapshot_app, terminal_size=(120, 40), run_before=review_then("p"))


def test_review_screen_blind_pair_at_80x24(snap_compare, snapshot_app):
    """The next unjudged prompt, as the session resumes: A and B only."""
    assert snap_compare(snapshot_app, terminal_size=(80, 24), run_before=review_then())
