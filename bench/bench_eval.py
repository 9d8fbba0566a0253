"""Held-out answers one by one against batched (mlx-lm's batch_generate, engine/evaluate/batched.py): the first
N prompts of data/heldout.jsonl answered greedily by the embedded model, seconds and prompts/s for each way,
and how many batched answers equal the one-by-one answer (greedy both; a batch pads prompts on the left).
Batched runs share each system prompt's KV cache; --whole adds one run that reads every prompt whole.

    scripts/run python bench/bench_eval.py [--count 100] [--max-tokens 64] [--batches 8,16,32] [--whole 16]

Writes bench/eval_batched.json. Set MKL_NUM_THREADS to the cores you give it (the figures say how many).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  (the BLAS preload, before mlx)
from engine.config.schema import ModelConfig  # noqa: E402
from engine.evaluate.batched import batched_answers  # noqa: E402
from engine.evaluate.heldout import load_items  # noqa: E402
from engine.evaluate.metrics import MetricOptions, score  # noqa: E402
from engine.generate.reply import GenerationSettings, reply  # noqa: E402
from engine.model.loading import load_model  # noqa: E402


def tool_call_rate(answers: list[str], items) -> float:
    return sum(score("tool_call", a, i.reference, MetricOptions()) for a, i in zip(answers, items)) / len(items)


def save(result: dict, out: str) -> None:
    """After every run: a bench killed midway keeps what it measured."""
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", default="8,16,32")
    ap.add_argument("--whole", type=int, default=16, help="also this batch size with every prompt read whole "
                    "(no shared-prefix cache); 0 = not")
    ap.add_argument("--out", default=str(ROOT / "bench" / "eval_batched.json"))
    args = ap.parse_args()
    load = os.getloadavg()  # other work on the machine slows every figure alike, but say how busy it was
    model, tokenizer, info = load_model(ModelConfig(name="embedded"))
    items = load_items(ROOT / "data" / "heldout.jsonl", limit=args.count, metrics=["tool_call"])
    prompts = [(i.messages, i.tools) for i in items]

    def tokens(answers):
        return sum(len(tokenizer.encode(a, add_special_tokens=False)) for a in answers)

    t0 = time.perf_counter()
    one = [reply(model, tokenizer, i.messages, GenerationSettings(args.max_tokens, 0.0)) for i in items]
    seconds = time.perf_counter() - t0
    runs = [{"way": "one by one", "batch": 1, "seconds": round(seconds, 2),
             "prompts_per_s": round(len(items) / seconds, 3), "answer_tokens": tokens(one),
             "same_as_one_by_one": len(items), "tool_call": tool_call_rate(one, items),
             "load_average_after": os.getloadavg()}]
    print(f"one by one: {seconds:.1f} s, {len(items) / seconds:.2f} prompts/s", flush=True)
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores", "load_average_at_start": load,
        "threads": {k: os.environ.get(k) for k in ("MKL_NUM_THREADS", "OMP_NUM_THREADS")},
        "versions": {"python": platform.python_version(), "mlx": version("mlx"), "mlx-lm": version("mlx-lm")},
        "model": "embedded (SmolLM2-135M-Instruct)", "dtype": info.dtype, "prompts": len(items),
        "max_tokens": args.max_tokens, "command": " ".join(["python", "bench/bench_eval.py", *sys.argv[1:]]),
        "runs": runs, "speedup": {},
    }
    save(result, args.out)
    ways = [("batched", int(b), True) for b in args.batches.split(",")]
    if args.whole:  # the same batches without the shared-prefix caches: what sharing the system prompt saves
        ways.append(("batched, each prompt read whole", args.whole, False))
    for way, batch, share in ways:
        t0 = time.perf_counter()
        answers = batched_answers(model, tokenizer, prompts, args.max_tokens, batch, share_prefixes=share)
        seconds = time.perf_counter() - t0
        differ = [k for k, (a, b) in enumerate(zip(one, answers)) if a != b]
        runs.append({"way": way, "batch": batch, "seconds": round(seconds, 2),
                     "prompts_per_s": round(len(items) / seconds, 3), "answer_tokens": tokens(answers),
                     "same_as_one_by_one": len(items) - len(differ), "tool_call": tool_call_rate(answers, items),
                     "differ": [{"item": items[k].id, "one_by_one": one[k], "batched": answers[k]}
                                for k in differ[:5]]})
        runs[-1]["load_average_after"] = os.getloadavg()
        result["speedup"][f"{way}, batch {batch}"] = round(runs[0]["seconds"] / seconds, 2)
        save(result, args.out)
        print(f"{way}, batch {batch}: {seconds:.1f} s, {len(items) / seconds:.2f} prompts/s, "
              f"{runs[0]['seconds'] / seconds:.2f}x one by one; {len(items) - len(differ)}/{len(items)} answers "
              "the same", flush=True)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
