"""Queueing the next step before reading this one (engine/train/step_queue.py): on by default on CUDA with
the flat update only (measured faster there on an H100), forced on here, on the CPU, with the real embedded
model. A user must not be able to tell it is on: the same losses, validation, checkpoints and adapter; a stop
or a save lands on a step whose weights it holds; a diverged run ends with the last good weights, though one
more step was queued behind it."""

import math
import threading

import numpy as np
import pytest

from engine import protocol as ev
from engine.train import flat_update, step_queue
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


def looked_ahead(seen) -> list[int]:
    """The steps queued while the step before them was still unread: queue index i (step i + 1) seen before
    the report of step i."""
    reported, ahead = set(), []
    for x in seen:
        if isinstance(x, ev.Step):
            reported.add(x.step)
        elif isinstance(x, tuple) and x[1] > 0 and x[1] not in reported:
            ahead.append(x[1] + 1)
    return ahead


def test_look_ahead_trains_the_same_run(data, tmp_path, look_ahead, embedded_dir, monkeypatch):
    import mlx.core as mx
    runs, events, queue = {}, {}, step_queue.StepQueue.queue
    for on in (False, True):
        look_ahead(on)
        seen = []
        monkeypatch.setattr(step_queue.StepQueue, "queue", lambda self, i, h: seen.append(("queued", i)) or
                            queue(self, i, h))
        run = TrainingRun(config(data, tmp_path / str(on)), [seen.append])
        runs[on], events[on] = (run, run.run()), seen
    (plain, a), (queued, b) = runs[False], runs[True]
    assert a.status == b.status == "finished" and b.step == 7
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-6)
    assert looked_ahead(events[False]) == [] and len(looked_ahead(events[True])) >= 2
    events = {on: [e for e in seen if not isinstance(e, tuple)] for on, seen in events.items()}
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


def test_each_step_logs_its_scheduled_learning_rate_from_a_table_made_before_training(data, tmp_path, look_ahead,
                                                                                       embedded_dir):
    """The rates are computed once in prepare (schedule.step_rates), not read step by step: each read is an eval,
    and MLX holds an eval back while it is over its memory limit, so with the next step queued ahead on a GPU it
    could wait for the step in flight (the end-to-end gap itself was mostly elsewhere: bench/RESULTS.md, issue 22,
    seventeenth session). What the user sees must not change: each step's line shows its rate, warmup and decay."""
    import mlx.core as mx

    from engine.train.schedule import build_schedule
    look_ahead(True)
    cfg = config(data, tmp_path, iterations=6, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    cfg.evaluation.every_steps = cfg.checkpoints.every_steps = 0
    seen = []
    result = TrainingRun(cfg, [seen.append]).run()
    schedule = build_schedule(cfg, 6)
    expected = [float(schedule(mx.array(i))) for i in range(6)]  # step i + 1 trains at schedule(i)
    assert result.status == "finished"
    assert [e.learning_rate for e in seen if isinstance(e, ev.Step)] == pytest.approx(expected, rel=1e-6)
    assert expected[0] < expected[1] < expected[2] > expected[5] > 0  # warmup, then the decay


def test_a_save_pause_or_stop_lands_on_a_step_whose_weights_it_holds(data, tmp_path, look_ahead, embedded_dir):
    import mlx.core as mx

    def quiet(path):  # nothing due at any step: with look-ahead on, every step queues the next
        cfg = config(data, path, iterations=6)
        cfg.evaluation.every_steps = cfg.checkpoints.every_steps = 0
        return cfg

    def asks(e):  # from a listener, as the UI's buttons would, while the next step is in flight
        if isinstance(e, ev.Step) and e.step == 1:
            run.control.save_now()
        if isinstance(e, ev.Step) and e.step == 3:
            run.control.pause()
            threading.Timer(0.5, run.control.stop).start()  # the UI thread, later: stop (saves first)
    look_ahead(True)
    run, seen = TrainingRun(quiet(tmp_path / "queued")), []
    run.listeners += [seen.append, asks]
    result = run.run()
    # the step in flight when a request came finishes first; the save, pause and stop then name their step
    assert result.status == "stopped" and result.step == 4
    assert [e.step for e in seen if isinstance(e, ev.Paused)] == [4]
    assert [(e.step, e.reason) for e in seen if isinstance(e, ev.CheckpointSaved)] == [(2, "manual"), (4, "stop")]
    assert [e.step for e in seen if isinstance(e, ev.Step)] == [1, 2, 3, 4]
    saved = {c.step: c for c in CheckpointStore(result.run_dir / "checkpoints").list()}
    for step, on in ((2, True), (4, False)):  # a stop_after run, with look-ahead on and off
        look_ahead(on)
        plain = TrainingRun(quiet(tmp_path / f"plain{step}"), stop_after=step).run()
        a = mx.load(str(CheckpointStore(plain.run_dir / "checkpoints").list()[-1].path / "adapters.safetensors"))
        b = mx.load(str(saved[step].path / "adapters.safetensors"))
        assert plain.step == step and a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flat", [False, True], ids=["per-array", "flat"])
def test_a_diverged_run_keeps_the_last_good_weights(data, tmp_path, look_ahead, embedded_dir, monkeypatch, flat):
    # the guarded update array by array, and over one vector (engine/train/flat_update.py)
    outcome = {}
    for on in (False, True):
        look_ahead(on)
        monkeypatch.setattr(flat_update, "FLAT_UPDATE", on and flat)
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


def tiny_training():
    """A two-layer model with AdamW and a warmup, and its MSE micro step as the loop calls one."""
    import mlx.core as mx
    import mlx.nn as nn

    from engine.config.schema import Config
    from engine.train.schedule import build_optimizer, build_schedule
    cfg = Config()
    cfg.training.learning_rate, cfg.training.warmup_steps, cfg.training.grad_accumulation = 1e-2, 2, 1
    schedule = build_schedule(cfg, 10)
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    model.layers[0].freeze()
    optimizer = build_optimizer(cfg, schedule)
    optimizer.init(model.trainable_parameters())
    mse = nn.value_and_grad(model, lambda m, x, y: ((m(x) - y) ** 2).sum())

    def micro_step(inputs, targets, positions, weights):
        loss, grads = mse(model, inputs[..., None].astype(mx.float32) * mx.ones(4), targets[..., None] * mx.ones(4))
        return loss, weights.sum(), grads
    return cfg, schedule, model, optimizer, micro_step


def state_of(model, optimizer) -> dict:
    from mlx.utils import tree_flatten
    return {k: np.array(v) for k, v in tree_flatten((model.trainable_parameters(), optimizer.state))}


def test_the_guarded_update_applies_only_while_healthy():
    import mlx.core as mx
    from mlx.utils import tree_map

    from engine.train.step import build_guarded_update, build_update
    _, _, model, optimizer, _ = tiny_training()
    _, _, twin, twin_optimizer, _ = tiny_training()
    guarded, plain = build_guarded_update(model, optimizer), build_update(twin, twin_optimizer)
    for i, healthy in enumerate((True, False, True, False)):
        grads = tree_map(lambda p: mx.full(p.shape, 0.1 * (i + 1)), model.trainable_parameters())
        before = state_of(model, optimizer)
        guarded(grads, mx.array(healthy))
        mx.eval(model.parameters(), optimizer.state)
        after = state_of(model, optimizer)
        if healthy:  # the same update as the unguarded one: weights, moments, step count, learning rate
            plain(grads)
            assert after.keys() == state_of(twin, twin_optimizer).keys()
            for k, v in state_of(twin, twin_optimizer).items():
                np.testing.assert_allclose(after[k], v, rtol=1e-6, err_msg=k)
            assert any(not np.array_equal(after[k], before[k]) for k in before)
        else:  # nothing moves, the optimizer's step count and moments included
            for k in before:
                np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_a_finite_step_queued_behind_a_diverged_one_changes_nothing():
    import mlx.core as mx

    from engine.train.distributed import World
    from engine.train.schedule import step_rates
    from engine.train.step_queue import StepQueue
    cfg, schedule, model, optimizer, micro_step = tiny_training()
    batches = iter([np.full((2, 3), x, dtype=np.float32) for x in (1.0, np.nan, 2.0, 3.0)])

    def next_batch():
        from engine.train.losses import loss_inputs
        x = next(batches)
        return loss_inputs(x, np.ones_like(x), np.ones(x.shape, dtype=bool)), x.size
    steps = StepQueue(cfg.training, step_rates(schedule, 10), None, micro_step, model, optimizer, World(0, 1),
                      next_batch, None, look_ahead=True)
    start = state_of(model, optimizer)
    first = steps.queue(0, None)  # as the loop chains them: each step gets the flag of the one before
    mx.eval(first.loss)
    after_first = state_of(model, optimizer)
    assert first.healthy.item() and any(not np.array_equal(v, start[k]) for k, v in after_first.items())
    second = steps.queue(1, first.healthy)  # NaN inputs: a diverged step
    third = steps.queue(2, second.healthy)  # finite, queued behind it before the loop read the second
    mx.eval(third.loss)
    assert not math.isfinite(second.loss.item()) and math.isfinite(third.loss.item())
    assert not second.healthy.item() and not third.healthy.item()
    for k, v in state_of(model, optimizer).items():
        np.testing.assert_array_equal(v, after_first[k], err_msg=k)
    fresh = steps.queue(3, None)  # a new chain starts healthy and applies
    mx.eval(fresh.loss)
    assert fresh.healthy.item() and any(not np.array_equal(v, after_first[k])
                                        for k, v in state_of(model, optimizer).items())


def test_the_guarded_update_takes_an_optimizer_not_yet_initialised():
    # MLX optimizers make their state on the first update; the guard needs the old state before it
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from engine.train.step import build_guarded_update
    model, optimizer = nn.Linear(3, 2), optim.AdamW(learning_rate=1e-2)
    update = build_guarded_update(model, optimizer)
    update({"weight": mx.ones((2, 3)), "bias": mx.ones(2)}, mx.array(True))
    mx.eval(optimizer.state)
    assert optimizer.state["step"].item() == 1 and optimizer.state["weight"]["m"].sum().item() > 0
