#!/usr/bin/env python3
"""Where `lora-tui train` loses ~7% a step to the bench step with LoRA on all seven layers (sixteenth and
seventeenth sessions): one process, one model (loaded by TrainingRun's own prepare), one memory limit, and the
step taken four ways, alternating, so that the GPU's drift between calls cannot decide it:

  bench-loop    bench_gpu.queued_step on TrainingRun's model and optimizer, one batch of the run's data made once
  queue-fixed   engine StepQueue (look-ahead, rate table) with that batch's arrays made from host data each step,
                as lora-tui did before engine/train/batch_feed.py
  queue-data    StepQueue fed by BatchFeed unchunked: the run's own batches, collated and made each step
  queue-feed    StepQueue fed by BatchFeed chunked (its CUDA default): views into one upload per 32 batches
  lora-tui      TrainingRun's own loop (events, the step line, the run log), the compiled step reused
With --more, four more, each StepQueue with the fixed batch:
  queue-device  the arrays made once (as the bench's): no host-made array per step
  queue-noseed  host-made arrays each step, but no mx.random.seed per step
  queue-held    host-made arrays each step, each kept alive to the end (never freed mid-run)
  queue-packed  each step's four arrays made as one host array (views into it): a quarter of the allocations
Why: MLX's CUDA allocator puts a host-made array in managed memory; freed, it goes to the buffer cache, and when
the cache is trimmed (a cache miss over the memory limit, as during every step here) cudaFree synchronizes the
whole device, so the GPU drains while the host is still encoding the next step. queue-held equal to queue-device
would say the frees cost; equal to queue-fixed, the allocations.

  python3 bench/gpu/session17/e2e_bisect.py [--targets all] [--steps 30] [--rounds 2] --out $OUT

Each of the first three runs `--steps` steps after 4 warm-up steps; its per-step times (one loop iteration each)
are printed with their median. On a CPU, BENCH_GPU_SMOKE=1 uses the tiny shape (plumbing only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import bench_gpu  # noqa: E402
import bench_gpu_e2e  # noqa: E402

WARM = 4


def timed(name: str, step, n: int) -> dict:
    """n + WARM calls of step(i); the times between successive returns after the warm-up."""
    marks = []
    for i in range(n + WARM):
        step(i)
        marks.append(time.perf_counter())
    gaps = [1e3 * (b - a) for a, b in zip(marks[WARM - 1:], marks[WARM:])]
    tokens = bench_gpu.BATCH * bench_gpu.SEQ
    median = statistics.median(gaps)
    out = {"variant": name, "median_ms": round(median, 1), "mean_ms": round(statistics.mean(gaps), 1),
           "tokens_per_s": round(tokens / (median / 1e3)), "gaps_ms": [round(g) for g in gaps]}
    print(f"{name:12s} median {median:6.1f} ms  mean {out['mean_ms']:6.1f} ms  {out['tokens_per_s']} tok/s",
          flush=True)
    return out


def step_queue_loop(run, micro, vector, next_batch):
    """TrainingRun's look-ahead loop without its events: queue i+1, read i."""
    from engine.train.step_queue import StepQueue
    setup = run.setup
    queue = StepQueue(run.cfg.training, setup.rates, None, micro, setup.model, setup.optimizer, run.world,
                      next_batch, None, True, vector)
    state = {"queued": None}

    def step(i):
        if state["queued"] is None:
            state["queued"] = queue.queue(i % len(setup.rates), None)
        ahead = queue.queue((i + 1) % len(setup.rates), state["queued"].healthy)
        state["queued"].loss.item(), state["queued"].norm.item()
        state["queued"] = ahead
    return step


def feed(run, chunked: bool):
    from engine.train.batch_feed import BatchFeed
    cfg = run.cfg
    return BatchFeed(run.setup, run.state, run.world, cfg.training.seed, cfg.data.shuffle, cfg.model.max_seq_length,
                     chunked=chunked)


def more_variants(run, micro, vector, host, fixed, tokens, steps: int) -> list:
    import mlx.core as mx
    import numpy as np

    from engine.train.losses import loss_inputs
    out = [timed("queue-device", step_queue_loop(run, micro, vector, lambda: (fixed, tokens)), steps)]
    seed = mx.random.seed
    mx.random.seed = lambda s: None
    out.append(timed("queue-noseed", step_queue_loop(run, micro, vector, lambda: (loss_inputs(*host), tokens)),
                     steps))
    mx.random.seed = seed
    held = []

    def kept_alive():
        held.append(loss_inputs(*host))
        return held[-1], tokens
    out.append(timed("queue-held", step_queue_loop(run, micro, vector, kept_alive), steps))
    held.clear()
    parts = [np.asarray(x) for x in fixed]
    one = np.concatenate([p.reshape(-1).view(np.int32) for p in parts])

    def packed():
        array, res, at = mx.array(one.copy()), [], 0  # one host-made array a step
        for p in parts:
            v = array[at:at + p.size].reshape(p.shape)
            res.append(v.view(mx.float32) if p.dtype == np.float32 else v)
            at += p.size
        return tuple(res), tokens
    out.append(timed("queue-packed", step_queue_loop(run, micro, vector, packed), steps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="all", choices=list(bench_gpu.TARGETS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--more", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import mlx.core as mx

    from engine.config.loading import load_config
    from engine.train import run as run_module
    from engine.train.flat_update import flat_parameters
    from engine.train.losses import loss_inputs
    from engine.train.step import build_micro_step

    model_dir, _ = bench_gpu.peers.ensure_checkpoint()
    tmp = Path(tempfile.mkdtemp(prefix="bisect-"))
    data = bench_gpu_e2e.write_data(tmp / "data", 64 * bench_gpu.BATCH)
    config = bench_gpu_e2e.write_config(tmp, model_dir, data, 40, args.targets, False, 1000)
    results, lines = [], []
    original_train = run_module.TrainingRun._train

    def bisect_then_train(run):
        setup = run.setup
        vector = flat_parameters(setup.model, setup.optimizer)
        micro = build_micro_step(setup.model, setup.optimizer, vector)
        rows = list(range(bench_gpu.BATCH))  # the data's first rows, as one rank's share of one global batch
        inputs, targets, mask, tokens = feed(run, False)._collated(rows, rows)
        host = (inputs, targets, mask)
        fixed = loss_inputs(*host)
        mx.eval(fixed)
        print(f"memory limit {mx.get_memory_limit() / 1e9:.1f} GB, active {mx.get_active_memory() / 1e9:.2f} GB, "
              f"flat {vector is not None}", flush=True)
        for r in range(args.rounds):
            loop = bench_gpu.queued_step(setup.model, setup.optimizer, micro, fixed, vector)
            results.append(timed("bench-loop", lambda i: loop(), args.steps))
            results.append(timed("queue-fixed", step_queue_loop(run, micro, vector,
                                                                 lambda: (loss_inputs(*host), tokens)), args.steps))
            results.append(timed("queue-data", step_queue_loop(run, micro, vector, feed(run, False).next_batch),
                                 args.steps))
            results.append(timed("queue-feed", step_queue_loop(run, micro, vector, feed(run, True).next_batch),
                                 args.steps))
            if args.more:
                results.extend(more_variants(run, micro, vector, host, fixed, tokens, args.steps))
        # TrainingRun's own loop with the same compiled step (no second compile, no second flat vector)
        run_module.flat_vector = lambda *a: vector
        run_module.build_micro_step = lambda *a: micro
        return original_train(run)

    run_module.TrainingRun._train = bisect_then_train

    def listener(event):
        if event.kind in ("Failed", "Log"):
            print(event, flush=True)
        if event.kind == "Step":
            lines.append(time.perf_counter())

    cfg = load_config(config)[0]
    result = run_module.TrainingRun(cfg, [listener], overwrite=True).run()
    gaps = [1e3 * (b - a) for a, b in zip(lines[WARM - 1:], lines[WARM:])]
    median = statistics.median(gaps)
    tps = round(bench_gpu.BATCH * bench_gpu.SEQ / (median / 1e3))
    print(f"{'lora-tui':12s} median {median:6.1f} ms  mean {statistics.mean(gaps):6.1f} ms  {tps} tok/s "
          f"({result.status}, peak {mx.get_peak_memory() / 1e9:.2f} GB)", flush=True)
    results.append({"variant": "lora-tui", "median_ms": round(median, 1), "tokens_per_s": tps,
                    "gaps_ms": [round(g) for g in gaps]})
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"e2e_bisect_{args.targets}.json").write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "versions": bench_gpu.versions(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
