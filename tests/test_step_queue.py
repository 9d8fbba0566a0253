"""Queueing the next step before reading this one (engine/train/step_queue.py): on by default on CUDA only,
forced on here, on the CPU, with the real embedded model. A user must not be able to tell it is on: the same
losses, validation, checkpoints and adapter; a stop or a save lands on a step whose weights it holds; a
diverged run ends with the last good weights, though one more step was queued behind the diverged one."""

import math

import numpy as np
import pytest

from engine import protocol as ev
from engine.train import step_queue
from engine.train.checkpoints import CheckpointStore
from engine.train.run import TrainingRun
from helpers import addition_chats, tiny_config, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl", addition_chats(48, seed=0, system="Add."))


@pytest.fixture
def look_ahead(monkeypatch):
    def switch(on: bool) -> None:
        monkeypatch.setattr(step_queue, "LOOK_AHEAD", on)
    return switch


def config(data, tmp_path, **training):
    return tiny_config(tmp_path, data={"path": str(data)}, lora={"dropout": 0.1},
                       training={"iterations": 7, "grad_accumulation": 2, "warmup_steps": 2, **training},
                       evaluation={"every_steps": 2, "val_batches": 2}, checkpoints={"every_steps": 3, "keep_last": 5})


def trained(run: TrainingRun) -> dict:
    from mlx.utils import tree_flatten
    return {k: np.array(v) for k, v in tree_flatten(run.setup.model.trainable_parameters())}


def test_look_ahead_trains_the_same_run(data, tmp_path, look_ahead, embedded_dir):
    import mlx.core as mx
    runs, events = {}, {}
    for on in (False, True):
        look_ahead(on)
        seen = []
        run = TrainingRun(config(data, tmp_path / str(on)), [seen.append])
        runs[on], events[on] = (run, run.run()), seen
    (plain, a), (queued, b) = runs[False], runs[True]
    assert a.status == b.status == "finished" and b.step == 7
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-6)
    kinds = lambda seen: [(e.kind, e.step) for e in seen if e.kind in ("Step", "Eval", "CheckpointSaved")]  # noqa
    assert kinds(events[True]) == kinds(events[False])  # validation and saves at the same steps, in order
    lrs = lambda seen: [e.learning_rate for e in seen if isinstance(e, ev.Step)]  # noqa: E731
    assert lrs(events[True]) == pytest.approx(lrs(events[False]), rel=1e-6)
    vals = lambda seen: [e.val_loss for e in seen if isinstance(e, ev.Eval)]  # noqa: E731
    np.testing.assert_allclose(vals(events[True]), vals(events[False]), rtol=1e-5)
    for k, w in trained(plain).items():
        np.testing.assert_allclose(trained(queued)[k], w, rtol=1e-5, atol=1e-7)
    saves = [CheckpointStore(r.run_dir / "checkpoints").list() for r in (a, b)]
    assert [c.step for c in saves[1]] == [c.step for c in saves[0]] and len(saves[0]) >= 3
    for x, y in zip(*saves):  # each checkpoint holds its own step's weights, not the next one's
        wx, wy = (mx.load(str(c.path / "adapters.safetensors")) for c in (x, y))
        for k in wx:
            np.testing.assert_allclose(np.array(wy[k]), np.array(wx[k]), rtol=1e-5, atol=1e-7)


def test_a_save_or_stop_lands_on_a_step_whose_weights_it_holds(data, tmp_path, look_ahead, embedded_dir):
    import mlx.core as mx

    def quiet(path):  # nothing due at any step: with look-ahead on, every step queues the next
        cfg = config(data, path, iterations=6)
        cfg.evaluation.every_steps = cfg.checkpoints.every_steps = 0
        return cfg

    def asks(e):  # from a listener, as the UI's buttons would, while the next step is in flight
        if isinstance(e, ev.Step):
            {1: run.control.save_now, 3: run.control.stop}.get(e.step, lambda: None)()
    look_ahead(True)
    run, seen = TrainingRun(quiet(tmp_path / "queued")), []
    run.listeners += [seen.append, asks]
    result = run.run()
    # the step in flight when the request came finishes first; the save and the stop then name their step
    assert result.status == "stopped" and result.step == 4
    assert [(e.step, e.reason) for e in seen if isinstance(e, ev.CheckpointSaved)] == [(2, "manual"), (4, "stop")]
    saved = {c.step: c for c in CheckpointStore(result.run_dir / "checkpoints").list()}
    look_ahead(False)
    for step in (2, 4):
        plain = TrainingRun(quiet(tmp_path / f"plain{step}"), stop_after=step).run()
        a = mx.load(str(CheckpointStore(plain.run_dir / "checkpoints").list()[-1].path / "adapters.safetensors"))
        b = mx.load(str(saved[step].path / "adapters.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-5, atol=1e-7)


def test_a_diverged_run_keeps_the_last_good_weights(data, tmp_path, look_ahead, embedded_dir):
    outcome = {}
    for on in (False, True):
        look_ahead(on)
        cfg = config(data, tmp_path / str(on), learning_rate=1e30, warmup_steps=0)  # blows up in a few steps
        cfg.evaluation.every_steps = cfg.checkpoints.every_steps = 0
        run = TrainingRun(cfg)
        outcome[on] = run, run.run()
    (plain, a), (queued, b) = outcome[False], outcome[True]
    assert a.status == b.status == "failed" and "training diverged at step" in a.message
    assert b.message == a.message and b.step == a.step < 7
    assert all(math.isfinite(x) for x in b.losses)
    kept = trained(queued)
    assert all(np.isfinite(w).all() for w in kept.values())
    for k, w in trained(plain).items():  # the step queued behind the diverged one changed nothing either
        np.testing.assert_allclose(kept[k], w, rtol=1e-5)
