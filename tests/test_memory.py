"""The pre-training memory estimate against MLX's measured peak on the embedded model, at three sizes, and
the warning a user gets when a run will not fit."""

import json
import subprocess
import sys

from helpers import ROOT, increments, tiny_config, write_jsonl

# In a process of its own, so that no other test's arrays count towards the peak.
MEASURE = """
import json, sys
import numpy as np
import engine
import mlx.core as mx, mlx.optimizers as optim
from mlx.utils import tree_flatten
from engine.model.adapters import apply_lora, trainable_count
from engine.config.schema import Config
from engine.train.losses import loss_inputs
from engine.model.memory import ModelShape, estimate_step_memory
from engine.model.loading import load_model
from engine.train.step import accumulate_gradients, build_micro_step, build_update
cfg = Config()
model, _, _ = load_model(cfg.model)
apply_lora(model, cfg.lora)
opt = optim.AdamW(learning_rate=1e-4)
step, update = build_micro_step(model, opt), build_update(model, opt)
weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
rng = np.random.default_rng(0)
for batch, length, trained in {sizes}:
    tokens = rng.integers(0, 40000, (batch, length + 1)).astype(np.int32)
    mask = np.zeros((batch, length), bool)
    mask[:, int(length * (1 - trained)):] = True
    mx.clear_cache(); mx.reset_peak_memory()
    for _ in range(2):
        grads, loss = accumulate_gradients(step, iter([loss_inputs(tokens[:, :-1], tokens[:, 1:], mask)]))
        update(grads)
        mx.eval(loss, model.parameters(), opt.state)
    est = estimate_step_memory(ModelShape.of(model), weights, trainable_count(model), batch, length, trained)
    print(json.dumps({{"size": [batch, length, trained], "measured": mx.get_peak_memory(), "estimated": est.total}}))
"""

SIZES = [(1, 256, 1.0), (4, 512, 0.2), (2, 1024, 0.5)]


def test_estimate_is_within_25_percent_of_the_measured_peak(embedded_dir):
    r = subprocess.run([sys.executable, "-c", MEASURE.format(sizes=SIZES)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(SIZES)
    for row in rows:
        ratio = row["estimated"] / row["measured"]
        print(f"batch x length x trained {row['size']}: measured {row['measured'] / 1e9:.2f} GB, "
              f"estimated {row['estimated'] / 1e9:.2f} GB ({ratio:.2f}x)")
        assert 0.75 <= ratio <= 1.25, row


def test_a_run_that_cannot_fit_is_warned_before_the_first_step(tmp_path, embedded_dir, monkeypatch):
    from engine import protocol as ev
    from engine.model import memory
    from engine.train.run import TrainingRun
    cfg = tiny_config(tmp_path, data={"path": str(write_jsonl(tmp_path / "d.jsonl", increments(8)))},
                      training={"iterations": 1}, evaluation={"every_steps": 0})
    # A machine with 300 MB to spare: less than the embedded model's own weights in float32.
    monkeypatch.setattr(memory, "available_bytes", lambda: 300_000_000)
    events = []
    TrainingRun(cfg, [events.append], stop_after=0).run()
    warnings = [e.message for e in events if isinstance(e, ev.Warning) and e.message.startswith("memory:")]
    assert len(warnings) == 1 and "0.3 GB is available" in warnings[0] and "batch_size" in warnings[0]
    first_step = next((i for i, e in enumerate(events) if isinstance(e, ev.Step)), len(events))
    assert events.index(next(e for e in events if isinstance(e, ev.Warning)
                             and e.message.startswith("memory:"))) < first_step
