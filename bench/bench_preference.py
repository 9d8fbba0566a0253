#!/usr/bin/env python3
"""Does KTO on the labels help, measured honestly: desirable-only SFT against KTO from scratch and KTO on top
of the SFT adapter, each the same number of steps on the sample data (embedded model, this machine), then
base and the three adapters on
  (a) exact tool calls on data/heldout.jsonl's tool prompts (cities, tickers, languages never trained on),
  (b) data/heldout_answers.jsonl: the tool's result is given, the answer must state its facts (faithful) and
      no number neither the user nor the tool gave (made up),
  (c) the implicit reward beta * (log p_model - log p_base) of desirable and undesirable validation rows
      (KTO's own split), and their margin: how much more the model prefers the good rows than the base does,
  (d) data/heldout.jsonl's no-tool prompts: a reply without a <tool_call> is right.

  scripts/run python bench/bench_preference.py [--iterations 60] [--tool 30] [--no-tool 20] [--answers 20]
                                               [--reward-rows 24] [--out bench/preference.json]

Same overrides as bench/bench_finetune.py (its ~10-minute schedule) for all three runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine  # noqa: E402,F401

from bench_finetune import OVERRIDES  # noqa: E402


def train(cfg, name: str, method: str, init_adapter: str = "", lr: float | None = None) -> dict:
    import copy

    from engine.train.run import TrainingRun
    cfg = copy.deepcopy(cfg)
    cfg.output.run_name, cfg.training.method, cfg.training.init_adapter = name, method, init_adapter
    cfg.training.learning_rate = lr or cfg.training.learning_rate
    steps = []

    def listen(e):
        if e.kind == "Step":
            steps.append(e)
            if e.step % 10 == 0:
                print(f"  {name} step {e.step}: loss {e.loss:.4f}, {e.tokens_per_sec:.0f} tok/s"
                      + (f"; {e.preference.describe()}" if e.preference else ""), flush=True)
    t0 = time.perf_counter()
    result = TrainingRun(cfg, [listen]).run()
    assert result.status == "finished", result.message
    seconds = time.perf_counter() - t0
    step_s = [b.time - a.time for a, b in zip(steps, steps[1:])]
    return {"adapter": str(result.run_dir / "adapter"), "seconds": round(seconds, 1),
            "median_step_s": round(sorted(step_s)[len(step_s) // 2], 2) if step_s else None,
            "final_loss": result.report.get("final_train_loss"),
            "peak_gb": round(result.report["peak_memory"]["mlx_peak_bytes"] / 1e9, 2)}


def _finished(folder: Path) -> dict:
    """A run trained earlier (e.g. by an interrupted call of this script): its adapter and its report's figures."""
    report = json.loads((folder / "report.json").read_text())
    steps = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    times = [e["time"] for e in steps if e["event"] == "Step"]
    step_s = sorted(b - a for a, b in zip(times, times[1:]))
    return {"adapter": str(folder / "adapter"), "seconds": report["seconds"], "final_loss": report["final_train_loss"],
            "median_step_s": round(step_s[len(step_s) // 2], 2) if step_s else None,
            "peak_gb": round(report["peak_memory"]["mlx_peak_bytes"] / 1e9, 2),
            "learning_rate": report["config"]["training"]["learning_rate"]}


def reward_rows(cfg, tokenizer, n: int):
    """n desirable and n undesirable rows of the validation split KTO uses (the same seed and split)."""
    import copy

    from engine.data import prepare_dataset
    kto = copy.deepcopy(cfg)
    kto.training.method = "kto"
    valid = prepare_dataset(kto, tokenizer).valid
    good = [e for e in valid if e.label == "desirable"][:n]
    bad = [e for e in valid if e.label == "undesirable"][:n]
    return good, bad


def sequence_logps(model, examples, pad_id, max_len):
    import mlx.core as mx
    import numpy as np

    from engine.train.losses import sequence_logps as logps_of
    from engine.train.preference_batches import sequence_arrays
    out = []
    for i in range(0, len(examples), 4):
        arrays = sequence_arrays([e.encoded for e in examples[i:i + 4]], pad_id, max_len)
        out.extend(np.array(logps_of(model, *map(mx.array, arrays[:5]))[0]).tolist())
    return np.array(out)


def evaluate(cfg, adapter: str | None, items: dict, rows, base_logps, beta: float) -> dict:
    from engine.evaluate.answers import answer_score
    from engine.evaluate.tool_calls import tool_call_score
    from engine.model.adapters import load_with_adapter
    from engine.model.loading import load_model
    t0 = time.perf_counter()
    if adapter:
        model, tokenizer, _ = load_with_adapter(cfg, adapter)
    else:
        model, tokenizer, _ = load_model(cfg.model)
        model.eval()
    calls = tool_call_score(model, tokenizer, items["tool"] + items["no_tool"], max_tokens=48, keep_examples=2)
    answers = answer_score(model, tokenizer, items["answers"], max_tokens=48, keep_examples=2)
    pad = tokenizer.eos_token_id
    good, bad = (sequence_logps(model, part, pad, cfg.model.max_seq_length) for part in rows)
    reward_good, reward_bad = beta * (good - base_logps[0]), beta * (bad - base_logps[1])
    return {"tool_exact": calls.rate("exact"), "tool_well_formed": calls.rate("well_formed"),
            "no_tool_right": calls.to_dict().get("no_tool"), "answers_faithful": answers.rate("faithful"),
            "answers_made_up": answers.rate("made_up"),
            "reward_desirable": float(reward_good.mean()), "reward_undesirable": float(reward_bad.mean()),
            "reward_margin": float(reward_good.mean() - reward_bad.mean()),
            "logp_desirable": float(good.mean()), "logp_undesirable": float(bad.mean()),
            "examples": calls.examples + answers.examples, "seconds": round(time.perf_counter() - t0, 1)}, \
        (good, bad)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--tool", type=int, default=30)
    ap.add_argument("--no-tool", type=int, default=20)
    ap.add_argument("--answers", type=int, default=20)
    ap.add_argument("--reward-rows", type=int, default=24)
    ap.add_argument("--kto-lrs", type=float, nargs="*", default=[],
                    help="KTO's peak learning rates (default: SFT's); each gives a KTO and an SFT+KTO run")
    ap.add_argument("--adapters", nargs="*", default=[], metavar="NAME=RUN_FOLDER",
                    help="evaluate these runs' adapters (a finished run's folder) instead of training")
    ap.add_argument("--out", default=str(ROOT / "bench" / "preference.json"))
    args = ap.parse_args()

    from engine.config.loading import load_config, set_value
    from engine.evaluate.answers import load_answer_items
    from engine.evaluate.tool_calls import load_heldout
    from engine.model.loading import load_tokenizer

    cfg, _ = load_config(ROOT / "config.yaml")
    for key, value in OVERRIDES.items():
        assert set_value(cfg, key, value) is None, key
    cfg.training.iterations = args.iterations
    cfg.evaluation.val_batches = 5  # the end-of-run validation (20 rows): the held-out sets below are the measure
    cfg.data.path = str(ROOT / cfg.data.path)
    cfg.output.dir = str(ROOT / "runs" / f"bench-preference-{time.strftime('%Y%m%d-%H%M%S')}")
    heldout = load_heldout(ROOT / cfg.evaluation.heldout_path)
    items = {"tool": [i for i in heldout if i["expected"] is not None][:args.tool],
             "no_tool": [i for i in heldout if i["expected"] is None][:args.no_tool],
             "answers": load_answer_items(ROOT / "data" / "heldout_answers.jsonl", args.answers)}
    print("overrides:", json.dumps(OVERRIDES | {"training.iterations": args.iterations}), flush=True)

    runs = {name: _finished(Path(folder)) for name, folder in (a.split("=", 1) for a in args.adapters)}
    for lr in [] if runs else args.kto_lrs or [cfg.training.learning_rate]:
        runs.setdefault("sft", train(cfg, "sft", "sft"))
        tag = "" if not args.kto_lrs else f"@{lr:g}"
        runs["kto" + tag] = train(cfg, "kto" + tag, "kto", lr=lr) | {"learning_rate": lr}
        runs["sft+kto" + tag] = train(cfg, "sft-kto" + tag, "kto", runs["sft"]["adapter"], lr) | {"learning_rate": lr}
    for name, r in runs.items():
        print(f"{name}: {r['seconds']} s, median step {r['median_step_s']} s, final loss {r['final_loss']}", flush=True)

    tokenizer = load_tokenizer(cfg.model)
    rows = reward_rows(cfg, tokenizer, args.reward_rows)
    results = {}
    results["base"], base_logps = evaluate(cfg, None, items, rows, (0.0, 0.0), cfg.training.beta)
    for name in ["base", *runs]:
        if name != "base":
            results[name], _ = evaluate(cfg, runs[name]["adapter"], items, rows, base_logps, cfg.training.beta)
        r = results[name]
        print(f"{name:8s} tool exact {r['tool_exact']:.2f}  no-tool right {r['no_tool_right']:.2f}  "
              f"faithful {r['answers_faithful']:.2f}  made up {r['answers_made_up']:.2f}  reward margin "
              f"{r['reward_margin'] if name != 'base' else 0:+.3f}  ({r['seconds']} s)", flush=True)
        if name == "base":
            results["base"].update(reward_desirable=0.0, reward_undesirable=0.0, reward_margin=0.0)
        write(args, cfg, items, runs, results)


def write(args, cfg, items, runs, results) -> None:
    """The results so far (after each model: a call cut short still leaves what it measured)."""
    import mlx.core as mx
    import mlx_lm

    from engine.blas import active
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.system()} {platform.machine()}, "
           f"{os.cpu_count()} cpus", "python": platform.python_version(), "mlx": mx.__version__,
           "mlx_lm": mlx_lm.__version__, "blas": active().name, "device": str(mx.default_device()), "overrides": OVERRIDES,
           "iterations": args.iterations, "beta": cfg.training.beta,
           "sizes": {k: len(v) for k, v in items.items()} | {"reward_rows": args.reward_rows},
           "runs": runs, "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
