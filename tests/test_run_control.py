"""RunControl as the Train screen uses it: "save a checkpoint now" while a run is paused saves at once, at the
step it paused on, and the run stays paused; asking twice for the same step keeps the first checkpoint."""

import json
import queue
from pathlib import Path

from helpers import run_in_thread, tiny_config

from engine import protocol as ev


def next_event(events: queue.Queue, kind, timeout: float = 120):
    while True:
        e = events.get(timeout=timeout)
        if isinstance(e, kind):
            return e
        if isinstance(e, ev.Failed):
            raise AssertionError(e.message)


def test_save_now_while_paused_saves_at_once_and_stays_paused(tmp_path, embedded_dir):
    # No interval checkpoints and no evaluation: the only checkpoints are the ones asked for and the last.
    cfg = tiny_config(tmp_path, training={"iterations": 200}, checkpoints={"every_steps": 0},
                      evaluation={"every_steps": 0})
    events: queue.Queue = queue.Queue()
    thread, control, result = run_in_thread(cfg, [events.put])
    try:
        next_event(events, ev.Step)
        control.pause()
        paused = next_event(events, ev.Paused)

        control.save_now()
        saved = next_event(events, ev.CheckpointSaved)
        assert (saved.step, saved.reason) == (paused.step, "manual")
        state = json.loads((Path(saved.path) / "trainer_state.json").read_text())
        assert state["step"] == paused.step
        assert control.paused  # saving did not resume the run

        control.save_now()  # the same step again: the first checkpoint stays as it is
        warning = next_event(events, ev.Warning)
        assert f"step {paused.step} is saved already" in warning.message
        while not events.empty():  # still paused: no step was trained meanwhile
            assert not isinstance(events.get_nowait(), ev.Step)
    finally:
        control.stop()
        thread.join(timeout=300)
    assert result and result[0].status == "stopped" and result[0].step == paused.step
