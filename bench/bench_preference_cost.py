#!/usr/bin/env python3
"""What a KTO / DPO / ORPO step costs against an SFT step on this machine (the embedded model, float32 CPU):
TrainingRun on the sample data, each method in its own process (clean peak memory), the same settings and
the same number of sequences through the gradient pass (batch 4 rows for SFT and KTO, 2 pairs for DPO and
ORPO); the median step after 2 warm-up steps, MLX's peak, and the one-time reference pass (KTO, DPO).

  scripts/run python bench/bench_preference_cost.py [--iterations 8] [--out bench/preference_cost.json]

DPO/ORPO need pairs and the sample data has labels: each pair is a desirable row's prompt (system + first
user turn) with its own answer chosen and the next desirable row's answer rejected (the same lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pair_file(folder: Path) -> Path:
    from engine.data import parse_record
    rows = []
    for line in (ROOT / "data" / "tool_calls.jsonl").read_text().splitlines():
        record = json.loads(line)
        conv, _ = parse_record(record, 0)
        if conv is not None and conv.label == "desirable" and conv.messages[1]["role"] == "user":
            rows.append(conv.messages)
    out = []
    for a, b in zip(rows, rows[1:] + rows[:1]):
        out.append({"prompt": a[:2], "chosen": a[2:], "rejected": b[2:]})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def one(method: str, iterations: int, folder: str) -> dict:
    import engine  # noqa: F401
    import mlx.core as mx

    from engine.train import losses
    losses.CE_CHUNK_BYTES = int(os.environ.get("BENCH_CE_CHUNK_BYTES", losses.CE_CHUNK_BYTES))

    from engine.config.loading import load_config, set_value
    from engine.train.run import TrainingRun
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_finetune import OVERRIDES
    cfg, _ = load_config(ROOT / "config.yaml")
    for key, value in OVERRIDES.items():
        assert set_value(cfg, key, value) is None, key
    cfg.training.method, cfg.training.iterations, cfg.training.warmup_steps = method, iterations, 1
    cfg.training.batch_size = 2 if method in ("dpo", "orpo") else 4
    cfg.data.path = str(Path(folder) / "pairs.jsonl") if method in ("dpo", "orpo") else str(ROOT / cfg.data.path)
    cfg.evaluation.every_steps, cfg.evaluation.val_batches = 0, 1
    cfg.output.dir, cfg.output.run_name = folder, method
    times, phases = [], {}

    def listen(e):
        if e.kind == "Step":
            times.append(e.time)
        elif e.kind == "Phase":
            phases.setdefault(e.name, [e.time, e.time])[1] = e.time
    result = TrainingRun(cfg, [listen]).run()
    assert result.status == "finished", result.message
    steps = sorted(b - a for a, b in zip(times[2:], times[3:]))
    ref = phases.get("reference log-probs")
    return {"method": method, "median_step_s": steps[len(steps) // 2], "steps": len(times),
            "peak_gb": mx.get_peak_memory() / 1e9, "reference_pass_s": round(ref[1] - ref[0], 1) if ref else None,
            "tokens_per_sec": result.report["tokens_per_sec"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["sft", "kto", "dpo", "orpo"])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "preference_cost.json"))
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], args.iterations, args.one[1])), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        pair_file(Path(folder))
        for method in args.methods:
            proc = subprocess.run([sys.executable, __file__, "--iterations", str(args.iterations), "--one", method,
                                   folder], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            results[method] = json.loads(line[7:]) if line else {"error": proc.stderr[-800:]}
            print(method, results[method], flush=True)
    sft = results.get("sft")
    for method, r in results.items():
        if "median_step_s" in r and sft and "median_step_s" in sft:
            print(f"{method:5s} step {r['median_step_s']:.2f} s ({r['median_step_s'] / sft['median_step_s']:.2f}x SFT), "
                  f"peak {r['peak_gb']:.2f} GB ({r['peak_gb'] / sft['peak_gb']:.2f}x), reference pass "
                  f"{r['reference_pass_s']} s")
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "iterations": args.iterations,
                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
