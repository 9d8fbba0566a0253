#!/usr/bin/env python3
"""Does the fine-tune visibly work? Train the embedded model on the sample dataset and compare base vs
tuned on validation loss and the held-out tool-call metric (held-out prompts use cities, tickers and
languages never seen in training; a call counts when it is well-formed JSON naming the right tool with
exactly the expected arguments).

  scripts/run python bench/bench_finetune.py [--iterations 60] [--heldout 60] [--out bench/finetune.json]

The run uses config.yaml with the overrides printed at the start (a shorter, higher-LR schedule so that
training fits in ~10 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401

OVERRIDES = {
    "lora.rank": 16, "lora.alpha": 32.0, "lora.num_layers": 16,
    "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "training.batch_size": 4, "training.grad_accumulation": 1, "training.learning_rate": 5e-4,
    "training.warmup_steps": 5, "evaluation.every_steps": 0, "checkpoints.every_steps": 0,
    "evaluation.sample_prompts": [],
}


def measure(model, tokenizer, data, heldout, cfg, pad_id, val_n):
    from engine.evaluate.tool_calls import tool_call_score
    from engine.train.validation import perplexity, validation_loss
    t0 = time.perf_counter()
    loss = validation_loss(model, data.valid[:val_n], cfg.training.batch_size, pad_id, cfg.model.max_seq_length)
    score = tool_call_score(model, tokenizer, heldout, max_tokens=64, keep_examples=4)
    return {"val_loss": loss, "perplexity": perplexity(loss), **score.to_dict(),
            "examples": score.examples, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--val", type=int, default=48, help="validation conversations to score")
    ap.add_argument("--out", default=str(ROOT / "bench" / "finetune.json"))
    args = ap.parse_args()

    import mlx.core as mx
    import mlx_lm

    from engine.model.adapters import adapters_disabled
    from engine.blas import active
    from engine.config.loading import load_config, set_value
    from engine.evaluate.tool_calls import load_heldout
    from engine.model.adapters import load_with_adapter
    from engine.train.run import TrainingRun

    cfg, _ = load_config(ROOT / "config.yaml")
    for key, value in OVERRIDES.items():
        assert set_value(cfg, key, value) is None, key
    cfg.training.iterations = args.iterations
    cfg.data.path = str(ROOT / cfg.data.path)
    cfg.output.dir = str(ROOT / "runs")
    cfg.output.run_name = f"bench-finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    print("overrides:", json.dumps(OVERRIDES | {"training.iterations": args.iterations}))
    heldout = load_heldout(ROOT / cfg.evaluation.heldout_path, args.heldout)

    t0 = time.perf_counter()
    result = TrainingRun(cfg, [lambda e: print(f"  step {e.step}: loss {e.loss:.3f}, {e.tokens_per_sec:.0f} tok/s",
                                               flush=True) if e.kind == "Step" and e.step % 10 == 0 else None]).run()
    train_s = time.perf_counter() - t0
    assert result.status == "finished", result.message
    print(f"trained {result.step} steps in {train_s:.0f} s ({result.report['tokens_per_sec']} tok/s)")

    model, tokenizer, _ = load_with_adapter(cfg, result.run_dir / "adapter")
    from engine.data import prepare_dataset
    data = prepare_dataset(cfg, tokenizer)
    pad = tokenizer.eos_token_id
    with adapters_disabled(model):
        base = measure(model, tokenizer, data, heldout, cfg, pad, args.val)
    tuned = measure(model, tokenizer, data, heldout, cfg, pad, args.val)
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.system()} {platform.machine()}, "
        f"{__import__('os').cpu_count()} cpus", "python": platform.python_version(),
        "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "blas": active().name,
        "overrides": OVERRIDES, "iterations": args.iterations, "train_seconds": round(train_s, 1),
        "train_tokens_per_sec": result.report["tokens_per_sec"], "final_train_loss": result.report["final_train_loss"],
        "base": base, "tuned": tuned,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    for k in ("val_loss", "perplexity", "well_formed", "right_tool", "exact"):
        print(f"{k:12s} base {base[k]:.3f}   tuned {tuned[k]:.3f}")
    print("tuned examples:", json.dumps(tuned["examples"][:2], indent=1))


if __name__ == "__main__":
    main()
