"""Helpers for Pilot tests: wait on the real engine thread without sleeping blindly."""

from __future__ import annotations

import asyncio


async def wait_for(pilot, condition, timeout: float = 120.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def shown(screen, selector: str) -> str:
    """The text a widget shows now (what a person reads there)."""
    return str(screen.query_one(selector).render())


def train_state(screen) -> str:
    """The Train screen's state label: idle, starting, running, paused, following, done, ..."""
    return shown(screen, "#train-state")


def answering(chat) -> bool:
    """An answer is on its way: the chat's Send button is off until it ends."""
    return chat.query_one("#chat-send").disabled


def notifications_shown(app) -> list[str]:
    """The text of every notification toast on the screen in front (title and message), as the user reads it
    (an app run with `run_test(notifications=True)`: Textual leaves toasts out of tests otherwise)."""
    return [str(toast.render()) for toast in app.screen.query("Toast")]
