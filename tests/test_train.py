"""The training engine on the real embedded model with a small config: resume determinism, control from
another thread, event order, NaN stop, atomic checkpoints, mlx-lm compatibility of adapters."""

import json
import math
import os
import threading

import numpy as np
import pytest

from engine import protocol as ev
from engine.train.checkpoints import CheckpointStore
from engine.config.schema import Config
from engine.train.run import TrainingRun
from helpers import addition_chats, run_in_thread, tiny_config, write_jsonl


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Short labelled conversations, one in four undesirable, so that a step takes well under a second."""
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    return write_jsonl(path, addition_chats(48, seed=0, system="Add.", undesirable_every=4))


def run_config(tiny_data, tmp_path, **training) -> Config:
    """6 steps of 2 accumulated micro-batches, validating and checkpointing every 3; `training` overrides."""
    return tiny_config(tmp_path, data={"path": str(tiny_data)},
                       lora={"dropout": 0.1},  # exercise the RNG state across resume
                       training={"iterations": 6, "grad_accumulation": 2, "warmup_steps": 2, **training},
                       evaluation={"every_steps": 3, "val_batches": 2, "sample_prompts": ["1+2"]},
                       checkpoints={"every_steps": 3, "keep_last": 2})


def test_resume_reproduces_the_uninterrupted_losses(tiny_data, tmp_path, embedded_dir):
    full = TrainingRun(run_config(tiny_data, tmp_path / "a")).run()
    assert full.status == "finished" and len(full.losses) == 6
    cfg = run_config(tiny_data, tmp_path / "b")
    first = TrainingRun(cfg, stop_after=3).run()
    assert first.status == "stopped" and first.step == 3
    resumed = TrainingRun(cfg, resume="latest").run()
    assert resumed.status == "finished" and resumed.step == 6
    np.testing.assert_allclose(first.losses + resumed.losses, full.losses, rtol=1e-5)
    # the schedule continued too: the last learning rate logged matches
    a = [json.loads(x) for x in open(full.run_dir / "metrics.jsonl")]
    b = [json.loads(x) for x in open(resumed.run_dir / "metrics.jsonl")]
    lr = lambda rows: [r["learning_rate"] for r in rows if r["event"] == "Step"]  # noqa: E731
    assert lr(a) == pytest.approx(lr(b), rel=1e-6)


def test_event_order_and_metrics_file(tiny_data, tmp_path, embedded_dir):
    seen = []
    result = TrainingRun(run_config(tiny_data, tmp_path), [seen.append]).run()
    kinds = [e.kind for e in seen if e.kind != "Phase"]
    assert kinds[0] == "Started" and kinds[-1] == "Finished"
    steps = [e.step for e in seen if isinstance(e, ev.Step)]
    assert steps == [1, 2, 3, 4, 5, 6]
    # at step 3: the step report, then validation, then the checkpoint
    at3 = [e.kind for e in seen if getattr(e, "step", None) == 3 and e.kind in ("Step", "Eval", "CheckpointSaved")]
    assert at3 == ["Step", "Eval", "CheckpointSaved"]
    assert any(isinstance(e, ev.Sample) for e in seen)
    step = next(e for e in seen if isinstance(e, ev.Step))
    assert step.memory.rss_bytes > 0 and step.memory.mlx_peak_bytes > 0 and step.tokens_per_sec > 0
    rows = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl")]
    assert [r["event"] for r in rows] == kinds
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["status"] == "finished" and report["best_val_loss"] == min(
        e.val_loss for e in seen if isinstance(e, ev.Eval))
    assert report["samples"][0]["prompt"] == "1+2" and report["data"]["set_aside"] == {"undesirable": 12}
    assert (result.run_dir / "train.log").read_text().count("step ") >= 6
    # keep_last=2 plus the best
    kept = {p.name for p in (result.run_dir / "checkpoints").iterdir() if p.name.startswith("step_")}
    assert kept == {"step_000003", "step_000006"}


def test_pause_resume_stop_from_another_thread(tiny_data, tmp_path, embedded_dir):
    cfg = run_config(tiny_data, tmp_path, iterations=50)
    cfg.checkpoints.every_steps = cfg.evaluation.every_steps = 0  # so the only checkpoint is the stop's
    events, stepped = [], threading.Event()

    def listener(e):
        events.append(e)
        if isinstance(e, ev.Step) and e.step == 2:
            stepped.set()

    thread, control, box = run_in_thread(cfg, [listener])
    assert stepped.wait(120)
    control.pause()
    paused_at = len(events)
    while not any(isinstance(e, ev.Paused) for e in events):
        thread.join(0.05)
    n_steps = sum(isinstance(e, ev.Step) for e in events)
    thread.join(0.5)
    assert sum(isinstance(e, ev.Step) for e in events) == n_steps  # really paused
    control.resume()
    control.stop()
    thread.join(120)
    assert not thread.is_alive() and paused_at <= len(events)
    result = box[0]
    assert result.status == "stopped" and result.step < 50
    saved = [e for e in events if isinstance(e, ev.CheckpointSaved)]
    assert saved[-1].reason == "stop" and saved[-1].step == result.step  # a stop saves first
    assert events[-1].kind == "Finished" and events[-1].stopped_early


def test_nan_stops_cleanly_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, embedded_dir):
    import mlx.core as mx
    cfg = run_config(tiny_data, tmp_path, iterations=6)
    cfg.checkpoints.every_steps = 2
    run = TrainingRun(cfg)

    def poison(e):  # a real fault inside the real loop: the weights blow up after step 3
        if isinstance(e, ev.Step) and e.step == 3:
            layer = run.setup.model.model.layers[-1].self_attn.q_proj
            layer.lora_b = mx.full(layer.lora_b.shape, mx.inf)

    run.listeners.append(poison)
    result = run.run()
    assert result.status == "failed" and "training diverged at step 4" in result.message
    assert "Lower training.learning_rate" in result.message
    store = CheckpointStore(result.run_dir / "checkpoints")
    assert [c.step for c in store.list()] == [2]
    weights = mx.load(str(store.list()[-1].path / "adapters.safetensors"))
    assert all(mx.isfinite(w).all().item() for w in weights.values())


def test_crash_between_write_and_rename_leaves_previous_checkpoint(tiny_data, tmp_path, embedded_dir,
                                                                 monkeypatch):
    import engine.atomic as atomic
    cfg = run_config(tiny_data, tmp_path, iterations=6)
    cfg.evaluation.every_steps = 0
    real_rename, calls = os.rename, {"n": 0}

    def rename(src, dst):
        if "step_" in str(dst):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    result = TrainingRun(cfg).run()
    assert result.status == "failed" and result.error_kind == "disk"
    assert "could not save the checkpoint at step 6" in result.message and "previous checkpoint is intact" in result.message
    folder = result.run_dir / "checkpoints"
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".json")] == ["step_000003"]
    # a hard kill cannot clean its temp folder: such leftovers are ignored and resume uses the good one
    (folder / ".step_000006.abc.tmp").mkdir()
    (folder / ".step_000006.abc.tmp" / "adapters.safetensors").write_bytes(b"\0" * 10)
    monkeypatch.undo()
    resumed = TrainingRun(cfg, resume="latest").run()
    assert resumed.status == "finished" and resumed.step == 6


def test_corrupt_latest_checkpoint_falls_back(tiny_data, tmp_path, embedded_dir):
    cfg = run_config(tiny_data, tmp_path, iterations=6)
    cfg.checkpoints.every_steps, cfg.evaluation.every_steps, cfg.checkpoints.keep_last = 2, 0, 5
    first = TrainingRun(cfg, stop_after=4).run()
    latest = first.run_dir / "checkpoints" / "step_000004"
    (latest / "trainer_state.json").write_text('{"step": 4, "ep')  # truncated
    warnings = []
    resumed = TrainingRun(cfg, [lambda e: warnings.append(e) if isinstance(e, ev.Warning) else None],
                          resume="latest").run()
    assert resumed.status == "finished"
    assert any("step_000004" in w.message and "unreadable" in w.message for w in warnings)
    assert len(resumed.losses) == 4  # resumed from step 2


def test_adapter_loads_in_mlx_lm_and_matches(tiny_data, tmp_path, embedded_dir):
    import mlx.core as mx
    from mlx_lm import load
    result = TrainingRun(run_config(tiny_data, tmp_path)).run()
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 32.0 / 4
    ours, tok = load(str(embedded_dir), adapter_path=str(result.run_dir / "adapter"))
    base, _ = load(str(embedded_dir))
    x = mx.array([tok.encode("12+30")])
    assert not mx.allclose(ours(x), base(x), atol=1e-3).item()  # the adapter changes the output
    # the same adapter through our loader gives the same logits
    from engine.model.adapters import load_with_adapter
    cfg = run_config(tiny_data, tmp_path)
    cfg.model.quantized_base = "keep"  # like mlx_lm.load: the quantized base (our scales are float32,
    mine, _, _ = load_with_adapter(cfg, result.run_dir / "adapter")  # mlx-lm's float16: tiny differences)
    assert mx.allclose(mine(x), ours(x), rtol=1e-3, atol=1e-2).item()
    assert (mine(x).argmax(-1) == ours(x).argmax(-1)).all().item()


def test_training_refuses_bad_targets(tiny_data, tmp_path, embedded_dir):
    cfg = run_config(tiny_data, tmp_path)
    cfg.lora.target_modules = ["q_proj", "query"]
    result = TrainingRun(cfg).run()
    assert result.status == "failed" and result.error_kind == "config"
    assert "lora.target_modules: query not found in this model; its linear layers are: down_proj, gate_proj" in result.message


def test_schedule_warmup_then_cosine():
    import mlx.core as mx
    from engine.train.schedule import build_schedule
    cfg = Config()
    cfg.training.learning_rate, cfg.training.warmup_steps = 1e-3, 4
    sched = build_schedule(cfg, 20)
    lrs = [float(sched(mx.array(i))) for i in range(20)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5])) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] < 1e-4 and math.isfinite(lrs[-1])


@pytest.mark.parametrize("kind, warmup, total", [("cosine", 4, 20), ("linear", 3, 9), ("constant", 2, 5),
                                                  ("cosine", 0, 7), ("linear", 5, 1), ("constant", 0, 3)])
def test_the_logged_rates_table_equals_the_schedule_step_by_step(kind, warmup, total):
    """schedule.step_rates: the log's table, made in one go, is the rate the optimizer uses at each step."""
    import mlx.core as mx
    from engine.train.schedule import build_schedule, step_rates
    cfg = Config()
    cfg.training.learning_rate, cfg.training.warmup_steps, cfg.training.lr_schedule = 1e-3, warmup, kind
    cfg.training.min_lr_ratio = 0.1
    schedule = build_schedule(cfg, total)
    rates = step_rates(schedule, total)
    assert rates.shape == (total,)
    assert rates.tolist() == pytest.approx([float(schedule(mx.array(i))) for i in range(total)], rel=1e-6)


def test_compiled_update_and_clip_equal_the_step_by_step_ones():
    # The training loop runs the optimizer update and the gradient clipping compiled (fused kernels).
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    from engine.train.step import apply_update, build_update, clip_gradients

    def train(compiled):
        mx.random.seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
        model.layers[0].freeze()
        opt = optim.AdamW(learning_rate=optim.cosine_decay(1e-2, 10), weight_decay=0.01)
        opt.init(model.trainable_parameters())
        update = build_update(model, opt) if compiled else (lambda g: apply_update(model, opt, g))
        norms = []
        for i in range(3):
            grads = tree_map(lambda p: mx.random.normal(p.shape) * (i + 1), model.trainable_parameters())
            if compiled:
                grads, norm = clip_gradients(grads, 1.0)
            else:
                grads, norm = optim.clip_grad_norm(grads, 1.0)
            norms.append(norm.item())
            update(grads)
        return dict(tree_flatten(model.parameters())), norms, opt.learning_rate.item()

    (eager, eager_norms, eager_lr), (fused, fused_norms, fused_lr) = train(False), train(True)
    assert fused_norms == pytest.approx(eager_norms, rel=1e-6) and fused_lr == pytest.approx(eager_lr)
    assert eager.keys() == fused.keys()
    for k in eager:
        assert mx.allclose(eager[k], fused[k], rtol=1e-6, atol=1e-7).item(), k


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_every_schedule_trains_without_warmup(schedule, tiny_data, tmp_path, embedded_dir):
    # A constant schedule without warmup once crashed in the optimizer's first update.
    cfg = run_config(tiny_data, tmp_path, iterations=2, warmup_steps=0, lr_schedule=schedule)
    cfg.evaluation.every_steps = cfg.checkpoints.every_steps = 0
    cfg.evaluation.sample_prompts = []
    events = []
    result = TrainingRun(cfg, [events.append]).run()
    assert result.status == "finished", result.message
    lrs = [e.learning_rate for e in events if isinstance(e, ev.Step)]
    assert lrs[0] == pytest.approx(1e-3) and (lrs[1] == pytest.approx(1e-3)) == (schedule == "constant")


@pytest.mark.parametrize("variant", ["dora", "qlora"])
def test_dora_and_qlora_train_and_save_mlx_lm_adapters(variant, tiny_data, tmp_path, embedded_dir):
    cfg = run_config(tiny_data, tmp_path, iterations=2)
    cfg.evaluation.every_steps = cfg.checkpoints.every_steps = 0
    cfg.evaluation.sample_prompts = []
    if variant == "dora":
        cfg.lora.use_dora = True
    else:
        cfg.model.quantized_base = "keep"  # LoRA on the 4-bit base (QLoRA)
    result = TrainingRun(cfg).run()
    assert result.status == "finished" and all(math.isfinite(x) for x in result.losses)
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == ("dora" if variant == "dora" else "lora")
    from mlx_lm import load
    model, _ = load(str(embedded_dir), adapter_path=str(result.run_dir / "adapter"))
    assert model is not None


def test_gradient_checkpointing_same_losses_and_only_for_that_run(tiny_data, tmp_path, embedded_dir):
    """grad_checkpoint recomputes activations instead of keeping them: the losses must not change, and the
    next run in the same process (the TUI's case) must not inherit it."""
    from mlx_lm.models.llama import TransformerBlock
    plain_call = TransformerBlock.__call__
    cfg_plain = run_config(tiny_data, tmp_path / "a", iterations=3)
    cfg_ckpt = run_config(tiny_data, tmp_path / "b", iterations=3, grad_checkpoint=True)
    # Without dropout: with it the two runs draw different masks (checkpointed blocks draw theirs from a key).
    cfg_plain.lora.dropout = cfg_ckpt.lora.dropout = 0.0
    plain = TrainingRun(cfg_plain).run()
    seen = []
    ckpt = TrainingRun(cfg_ckpt, listeners=[lambda e: seen.append(TransformerBlock.__call__ is plain_call)]).run()
    assert plain.status == ckpt.status == "finished"
    np.testing.assert_allclose(ckpt.losses, plain.losses, rtol=1e-5)
    assert False in seen  # it really was on during the run ...
    assert TransformerBlock.__call__ is plain_call  # ... and is off again afterwards


@pytest.mark.parametrize("use_dora,fused,seven", [(False, False, False), (False, True, False), (True, False, False),
                                                  (False, True, True)],
                         ids=["lora", "lora-fused-projections", "dora", "lora-all-seven-mlp-recompute"])
def test_checkpointed_gradients_are_those_of_the_loss_the_forward_pass_computed(use_dora, fused, seven, embedded_dir,
                                                                                 monkeypatch):
    """Gradient checkpointing recomputes each block in the backward pass. With dropout, mlx-lm's recompute
    draws new masks, so its gradients belong to another loss than the one reported; ours draws the masks
    the forward pass drew, and equals the same step run without checkpointing. `fused`: the frozen q/k/v and
    gate/up projections as one matmul each, and the frozen MLP recomputed by its own backward pass, as on CUDA.
    `seven`: LoRA on all seven layers, the adapted MLP recomputed by its own backward pass
    (checkpointed_lora_mlp.py)."""
    from engine.model import lean
    monkeypatch.setattr(lean, "FUSE_QKV", fused)
    monkeypatch.setattr(lean, "FUSE_GATE_UP", fused)
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.trainer import grad_checkpoint

    from engine.model.adapters import apply_lora
    from engine.train.losses import loss_inputs, masked_loss
    from engine.model.loading import load_model
    from engine.model.philox import dropout_keys
    from engine.train.step import checkpointed_layers

    cfg = Config()
    cfg.lora.rank, cfg.lora.num_layers, cfg.lora.dropout, cfg.lora.use_dora = 8, 4, 0.2, use_dora
    cfg.model.dtype, cfg.model.quantized_base = "float32", "dequantize"  # the CPU's defaults; on a GPU too
    if seven:
        cfg.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model, _, _ = load_model(cfg.model)
    apply_lora(model, cfg.lora)
    assert (type(model.layers[-1].self_attn.k_proj) is lean.SharedProductLinear) == (fused and not seven)
    model.train()
    mx.random.seed(3)  # trained-looking adapters (lora_b starts at 0, where masks would not change the loss)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    tokens = np.random.default_rng(0).integers(0, 40000, (2, 65)).astype(np.int32)
    batch = loss_inputs(tokens[:, :-1], tokens[:, 1:], np.ones((2, 64), bool))
    block_class = type(model.layers[0])
    plain_call = block_class.__call__

    def step():
        mx.random.seed(7)
        (loss, _), grads = nn.value_and_grad(model, masked_loss)(model, *batch)
        mx.eval(loss, grads)
        return loss.item(), dict(tree_flatten(grads))

    def keyed_call(block, *args, **kwargs):  # the same masks as checkpointing draws, without it
        with dropout_keys(mx.random.randint(0, 2 ** 31 - 1, (2,)).astype(mx.uint32)):
            return plain_call(block, *args, **kwargs)

    def worst(a, b):
        return max(float(np.abs(np.array(a[k]) - np.array(b[k])).max() / (np.abs(np.array(b[k])).max() + 1e-12))
                   for k in b)

    plain = step()
    try:
        grad_checkpoint(model.layers[0])  # mlx-lm's
        mlx_lm_ckpt = step()
        block_class.__call__ = keyed_call
        reference = step()
    finally:
        block_class.__call__ = plain_call
    from engine.model import checkpointed_lora_mlp, checkpointed_mlp
    monkeypatch.setattr(checkpointed_mlp, "CHECKPOINTED_MLP", fused)  # CUDA's default: the MLP's own recompute
    monkeypatch.setattr(checkpointed_lora_mlp, "CHECKPOINTED_LORA_MLP", seven)
    if seven:
        assert checkpointed_lora_mlp.applies(model.layers[-1].mlp)
    with checkpointed_layers(model, True):
        ours = step()
    assert reference[0] != pytest.approx(plain[0], rel=1e-5)  # the masks do change the loss
    assert ours[0] == pytest.approx(reference[0], rel=1e-5)
    assert worst(ours[1], reference[1]) < 1e-3
    # mlx-lm's: the forward pass is the plain one, the gradients are not
    assert mlx_lm_ckpt[0] == pytest.approx(plain[0], rel=1e-5)
    print(f"losses: plain {plain[0]}, keyed {reference[0]}, mlx-lm ckpt {mlx_lm_ckpt[0]}, ours {ours[0]}")
    print(f"largest relative gradient difference to the step without checkpointing: ours "
          f"{worst(ours[1], reference[1]):.1e}, mlx-lm's grad_checkpoint {worst(mlx_lm_ckpt[1], plain[1]):.1e}")
    assert worst(mlx_lm_ckpt[1], plain[1]) > 0.05


def pytorch_adamw(params, grads, lrs, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.AdamW's documented algorithm (amsgrad off), in float64 numpy: decoupled decay
    p -= lr*wd*p, then the moments, their bias corrections, and p -= lr * m_hat / (sqrt(v_hat) + eps)."""
    p, m, v, out = params.astype(np.float64), 0.0, 0.0, []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        p = p - lr * weight_decay * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


def test_our_adamw_updates_equal_pytorchs_on_the_same_gradients():
    """The optimizer and schedule training builds (build_optimizer, the compiled update) against PyTorch's
    AdamW algorithm: three steps with weight decay and warmup. MLX's default form, without the bias
    correction, makes the first step 3.2x larger (0.1 / sqrt(0.001))."""
    import mlx.core as mx
    import mlx.nn as nn

    from engine.train.schedule import build_optimizer, build_schedule
    from engine.train.step import build_update
    rng = np.random.default_rng(5)
    start = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) * s for s in (1.0, 0.1, 3.0)]

    def ours(correct: bool):
        cfg = Config()
        cfg.training.learning_rate, cfg.training.warmup_steps, cfg.training.weight_decay = 1e-3, 2, 0.1
        cfg.training.adam_bias_correction = correct
        schedule = build_schedule(cfg, 10)
        model = nn.Linear(4, 3, bias=False)
        model.weight = mx.array(start)
        optimizer = build_optimizer(cfg, schedule)
        optimizer.init(model.trainable_parameters())
        update, out = build_update(model, optimizer), []
        for g in grads:
            update({"weight": mx.array(g)})
            out.append(np.array(model.weight))
        return out, [float(schedule(mx.array(i))) for i in range(len(grads))]

    (got, lrs), (uncorrected, _) = ours(True), ours(False)
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warmup: the schedule's values, not the peak
    expected = pytorch_adamw(start, grads, lrs, weight_decay=0.1)
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
    first_ours, first_theirs = uncorrected[0] - start * (1 - lrs[0] * 0.1), expected[0] - start * (1 - lrs[0] * 0.1)
    assert np.abs(first_ours).mean() / np.abs(first_theirs).mean() == pytest.approx(0.1 / math.sqrt(0.001), rel=1e-3)
    assert Config().training.adam_bias_correction is True  # the default is PyTorch's form


@pytest.mark.parametrize("model,named", [({}, []), ({"dtype": "bfloat16"}, ["model.dtype is bfloat16"]),
                                         ({"quantized_base": "keep"}, ["model.quantized_base keeps"])],
                         ids=["defaults", "bfloat16", "quantized-base"])
def test_a_setting_that_makes_the_cpu_slow_is_named_at_the_start(tiny_data, tmp_path, embedded_dir, model, named):
    """On the CPU a bfloat16 or 4-bit base trains 17-34x slower than the defaults (loading.cpu_training_warnings):
    the run says so before its first step, and says nothing at the defaults."""
    seen = []
    cfg = tiny_config(tmp_path, data={"path": str(tiny_data)}, model=model, training={"iterations": 1})
    result = TrainingRun(cfg, [seen.append]).run()
    assert result.status == "finished"
    at = [i for i, e in enumerate(seen) if isinstance(e, ev.Warning) and "on the CPU" in e.message]
    assert len(at) == (1 if named else 0)
    assert all(name in seen[at[0]].message and "auto" in seen[at[0]].message for name in named)
    first_step = next(i for i, e in enumerate(seen) if isinstance(e, ev.Step))
    assert all(i < first_step for i in at)
