#!/usr/bin/env python3
"""`lora-tui train` end to end against the bench step, same GPU, same shape (issue 22's end-to-end target).

  python3 bench/bench_gpu_e2e.py [--targets qv|all] [--ckpt] [--steps 110] [--every 100] [--rounds 1] --out $OUT

Both train the Mistral-7B-shaped random model of bench_gpu.py (bf16, LoRA r16 / alpha 32 / dropout 0.05,
2 x 2048 tokens, loss on every position, AdamW 1e-4, clip 1.0):
  bench      bench_gpu.py's `mlx` variant: the engine's step functions in a loop over one in-memory batch
  lora-tui   the real command a user runs (`lora-tui --config C train`): TrainingRun with the data pipeline
             (a JSONL of plain-text rows through the tokenizer, validation, length-bucketed batches), the
             per-step log line, checkpoints (atomic adapter + optimizer state) every 100 steps as config.yaml
             has it, and the final save, the run folder
It reads the model from the random checkpoint bench_gpu_peers.py writes (config, bf16 safetensors and a
word-level tokenizer over the vocabulary), so each text row of 2,048 words is 2,048 tokens + EOS: inputs of
2 x 2,048, as in the bench. lora-tui's tokens/s is taken two ways: the median of its step lines after the
first three (what the app shows), and its whole steady stretch (tokens from step 4 to the last over the wall
time between those lines, so checkpoint saves and logging are counted). The target: within 5% of the bench.

On a CPU, BENCH_GPU_SMOKE=1 runs the tiny shape (bench_gpu.py's) to check the plumbing. BENCH_TIMES=FILE writes
the host's share of each step to FILE, the bench's (bench_gpu.queued_step) and lora-tui's (e2e_host_times.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_gpu  # noqa: E402  (the shape, the variants and the saved random checkpoint)
from bench_cpu import STEP_LINE  # noqa: E402  (lora-tui's step line: step, loss, tok/s, peak)
SKIP = 3  # the first steps compile the step and warm the allocator, as the bench's warm-up steps do


def write_data(folder: Path, rows: int) -> Path:
    """Rows of SEQ random words of the checkpoint's word-level vocabulary ("t4".."t<vocab-1>")."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    words = rng.integers(4, bench_gpu.SHAPE["vocab"], (rows, bench_gpu.SEQ))
    path.write_text("".join(json.dumps({"text": " ".join(f"t{w}" for w in row)}) + "\n" for row in words))
    return path


def write_config(tmp: Path, model: Path, data: Path, steps: int, targets: str, ckpt: bool, every: int,
                 memory_limit_gb: float = 0.0) -> Path:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["model"].update(name=str(model), dtype="bfloat16", max_seq_length=bench_gpu.SEQ + 1)
    cfg["lora"].update(rank=16, alpha=32.0, dropout=0.05, target_modules=bench_gpu.TARGETS[targets], num_layers=-1)
    cfg["training"].update(epochs=1, iterations=steps, batch_size=bench_gpu.BATCH, grad_accumulation=1,
                           learning_rate=1e-4, lr_schedule="constant", warmup_steps=0, weight_decay=0.01,
                           max_grad_norm=1.0, grad_checkpoint=ckpt, seed=0, memory_limit_gb=memory_limit_gb)
    cfg["data"].update(path=str(data), validation_split=0.0, train_labels=[], shuffle=True)
    cfg["evaluation"].update(every_steps=0, heldout_path="", sample_prompts=[])
    cfg["checkpoints"].update(every_steps=every, keep_last=3)
    cfg["output"].update(dir=str(tmp / "runs"), run_name=f"e2e-{targets}{'-ckpt' if ckpt else ''}",
                         log_every_steps=1)
    path = tmp / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_lora_tui(config: Path) -> dict:
    """The headless command, its stdout read line by line with arrival times."""
    cmd = [sys.executable, "-c", "import os, sys; sys.path.insert(0, sys.argv[1]); from tui.cli import main; "
           "os.environ.get('BENCH_TIMES') and (sys.path.insert(0, sys.argv[1] + '/bench') or "
           "__import__('e2e_host_times').install()); "
           "main(sys.argv[2:])", str(ROOT), "--config", str(config), "train",
           "--overwrite"]  # the next round reuses the run folder
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    steps, tail = [], []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if m := STEP_LINE.match(line.strip()):
            steps.append(dict(step=int(m[1]), loss=float(m[2]), tps=float(m[3]), at=time.perf_counter(),
                              peak_gb=float(m[4]) * (1 if m[5] == "GB" else 1e-3)))
    if proc.wait() != 0 or len(steps) <= SKIP + 1:
        return {"error": f"lora-tui train exited {proc.returncode}: " + " | ".join(tail[-8:])}
    steady = steps[SKIP:]
    tokens = bench_gpu.BATCH * bench_gpu.SEQ * (len(steady) - 1)  # the steps after the first steady line
    return dict(tokens_per_s=statistics.median(s["tps"] for s in steady),
                wall_tokens_per_s=tokens / (steady[-1]["at"] - steady[0]["at"]),
                peak_gb=max(s["peak_gb"] for s in steps), loss=steps[-1]["loss"], steps=len(steps),
                process_s=time.perf_counter() - t0, step_tps=[round(s["tps"]) for s in steps],
                gaps_ms=[round((b["at"] - a["at"]) * 1e3) for a, b in zip(steps, steps[1:])])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="qv", choices=list(bench_gpu.TARGETS))
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing in both")
    ap.add_argument("--steps", type=int, default=110)
    ap.add_argument("--every", type=int, default=100, help="checkpoints.every_steps (config.yaml: 100)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate bench / lora-tui this many times")
    ap.add_argument("--memory-limit-gb", type=float, default=0.0,
                    help="lora-tui's training.memory_limit_gb (0: from its estimate, as the bench step)")
    ap.add_argument("--lora-tui-first", action="store_true", help="each round runs lora-tui before the bench")
    ap.add_argument("--same-window", action="store_true",
                    help="the bench times as many steps as lora-tui's steady stretch (steps - 3), not 10")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.same_window:  # read by the bench's child process (bench_gpu.TIMED)
        os.environ["BENCH_TIMED"] = str(args.steps - SKIP)
    model, made_s = bench_gpu.peers.ensure_checkpoint()
    print(f"checkpoint {model} ({made_s:.0f} s to write)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="e2e-"))
    data = write_data(tmp / "data", args.steps * bench_gpu.BATCH)
    config = write_config(tmp, model, data, args.steps, args.targets, args.ckpt, args.every, args.memory_limit_gb)
    name = bench_gpu.row_name("mlx+ckpt" if args.ckpt else "mlx", args.targets)
    rounds = []
    for r in range(args.rounds):
        if args.lora_tui_first:  # where the device time may run out: the app's figure first
            e2e = run_lora_tui(config)
            print(f"round {r + 1} lora-tui {e2e}", flush=True)
        bench = bench_gpu.run_child(name, 0.05, timeout=600)
        print(f"round {r + 1} bench    {bench}", flush=True)
        if not args.lora_tui_first:
            e2e = run_lora_tui(config)
            print(f"round {r + 1} lora-tui {e2e}", flush=True)
        rounds.append({"bench": bench, "lora_tui": e2e})
    ok = [x for x in rounds if "tokens_per_s" in x["bench"] and "tokens_per_s" in x["lora_tui"]]
    summary = {"date": time.strftime("%Y-%m-%d"), "versions": bench_gpu.versions(), "targets": args.targets,
               "ckpt": args.ckpt, "steps": args.steps, "rounds": rounds}
    if ok:
        bench_tps = max(x["bench"]["tokens_per_s"] for x in ok)
        median_tps = max(x["lora_tui"]["tokens_per_s"] for x in ok)
        wall_tps = max(x["lora_tui"]["wall_tokens_per_s"] for x in ok)
        summary.update(step_line_ratio=round(median_tps / bench_tps, 3), wall_ratio=round(wall_tps / bench_tps, 3))
        print(f"\nbench {bench_tps:.0f} tok/s; lora-tui {median_tps:.0f} (step lines, median) = "
              f"{median_tps / bench_tps:.3f}x, {wall_tps:.0f} (wall, checkpoints included) = "
              f"{wall_tps / bench_tps:.3f}x (target >= 0.95x)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"bench_gpu_e2e_{args.targets}{'_ckpt' if args.ckpt else ''}.json").write_text(
            json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
