"""How engine results reach the screens: every result type has a message class and an owner, an unknown one
is dropped, and the Train screen's ctrl+s is on only while a run can save."""

import typing
from dataclasses import dataclass

import pytest

from engine import protocol as p
from tui import messages as msg
from tui.app import LoraTuiApp
from helpers import ROOT
from tui_helpers import wait_for

SIZE = (120, 40)


@pytest.mark.parametrize("result_type", typing.get_args(p.Result), ids=lambda t: t.__name__)
def test_every_result_has_a_message_and_an_owner(result_type):
    cls = msg.MESSAGE_FOR.get(result_type)
    assert cls is not None, f"no message class carries {result_type.__name__}"
    if cls is msg.EngineFailed:  # its owner is where the error's `what` says, or the app alone
        owners = {what: msg.EngineFailed(p.EngineError(what, "x")).owner
                  for what in typing.get_args(typing.get_type_hints(p.EngineError)["what"])}
        assert owners == {"dataset": "dataset", "training": None, "chat": "chat", "export": "chat", "review": "review",
                          "engine": None}
    else:
        assert cls.OWNER in LoraTuiApp.MODES


def test_the_log_lists_every_run_event_but_phases_and_steps():
    logged = {t for t, cls in msg.MESSAGE_FOR.items() if issubclass(cls, msg.RunLogged)}
    assert logged == set(typing.get_args(p.Event)) - {p.Phase, p.Step}


@dataclass(frozen=True)
class NewerResult:  # a result type no message carries (say, one a newer engine added)
    what: str = "x"


def test_an_unknown_result_has_no_message():
    assert msg.engine_message(NewerResult()) is None


async def test_an_unknown_result_is_dropped_without_an_exception(monkeypatch):
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    async with app.run_test(size=SIZE) as pilot:
        app.post_engine_result(NewerResult())  # the engine's emit, as the engine thread calls it
        app.post_engine_result(p.Warning("still routed"))
        await pilot.pause()
        assert app.is_running and app.current_mode == "config"


async def test_ctrl_s_is_dimmed_without_a_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.query("#start"), timeout=10, what="the train screen")
        screen = app.screen
        assert screen.check_action("save_now", ()) is None  # shown, dimmed: nothing to save
        screen.state = "running"
        assert screen.check_action("save_now", ()) is None  # no RunControl: not this app's run
        assert screen.check_action("start", ()) is True


async def test_prebuilt_screens_are_all_built_and_the_start_screen_stays(monkeypatch):
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: len(app.prebuilt) == len(app.MODES), timeout=30, what="the pre-builds")
        assert app.current_mode == "config" and len(app.screen_stack) == 1
        assert all(app.get_screen(mode).is_mounted for mode in app.MODES)


async def test_no_pre_build_while_a_dialog_is_open(monkeypatch):
    from tui.screens.confirm import ConfirmScreen
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    async with app.run_test(size=SIZE) as pilot:
        dialog = ConfirmScreen("A question")
        app.push_screen(dialog)
        before = set(app.prebuilt)
        await pilot.pause(1.5)  # several pre-build ticks
        assert app.screen is dialog and app.prebuilt <= before | {"config"}
        dialog.dismiss(False)
        await wait_for(pilot, lambda: len(app.prebuilt) == len(app.MODES), timeout=30, what="the pre-builds")


async def test_send_clicked_leaves_focus_in_the_input(monkeypatch):
    """Send is off while answering; clicked, it had the focus, which goes back to where typing goes on."""
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    async with app.run_test(size=SIZE) as pilot:
        monkeypatch.setattr(app, "submit", lambda command: None)  # no answer comes: it stays answering
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.screen.query("#chat-send"), timeout=10, what="the chat screen")
        app.screen.query_one("#chat-input").value = "hi"
        await pilot.click("#chat-send")
        await pilot.pause()
        assert app.screen.query_one("#chat-send").disabled
        assert app.screen.focused is app.screen.query_one("#chat-input")


class UnreadableRun:
    """A followed run whose metrics.jsonl cannot be read."""
    launched = False

    def run(self, on_event, should_stop):
        raise OSError("metrics.jsonl: permission denied")

    def problem(self):
        return None


async def test_a_follow_whose_reader_fails_ends_and_says_why(monkeypatch):
    from tui_helpers import train_state
    monkeypatch.chdir(ROOT)
    app = LoraTuiApp(None)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.query("#start"), timeout=10, what="the train screen")
        screen = app.screen
        screen.external = UnreadableRun()
        screen._set_buttons("following")
        screen.run_worker(screen._follow, thread=True, exit_on_error=False)
        await wait_for(pilot, lambda: train_state(screen) == "done", timeout=10, what="the follow's end")
        from tui_helpers import notifications_shown
        await wait_for(pilot, lambda: any("permission denied" in m for m in notifications_shown(app)), timeout=10,
                       what="the notice")
