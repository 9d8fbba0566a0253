"""Side-by-side chat (base and adapter answering the same prompt), through the engine worker as the app
drives it: seconds per turn, 3 turns, greedy, 24 tokens each side, on the config's base model.

    scripts/run python bench/bench_side_by_side.py --adapter runs/<run>/adapter [--order adapter,base]

--order base,adapter is what the chat screen sent before it queued the adapter first; with the worker
before 2026-11-26 each side's request reloaded the model (two loads a turn).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402,F401  (the BLAS preload, before mlx)
from engine.config.loading import load_config  # noqa: E402
from engine.generate.reply import GenerationSettings  # noqa: E402
from engine.protocol import EngineError, Generate, GenerationDone, Shutdown  # noqa: E402
from engine.worker import EngineWorker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="an adapter folder (adapter_config.json + adapters.safetensors)")
    ap.add_argument("--order", default="adapter,base", help="the order of each turn's two requests")
    ap.add_argument("--config", default=None, help="config file (default: built-in defaults)")
    ap.add_argument("--turns", type=int, default=3)
    args = ap.parse_args()
    cfg, _ = load_config(args.config)
    settings = GenerationSettings(max_tokens=24, temperature=0.0)
    messages = ({"role": "user", "content": "What is the capital of France?"},)
    events: list = []
    worker = EngineWorker(lambda e: events.append((time.perf_counter(), e)))
    sides = args.order.split(",")
    for turn in range(args.turns):
        for i, side in enumerate(sides):
            worker.submit(Generate(cfg, messages, settings, None if side == "base" else args.adapter,
                                   len(sides) * turn + i))
    worker.submit(Shutdown())
    start = time.perf_counter()
    worker.serve()  # on this thread, as the app's engine worker runs it
    errors = [e.message for _, e in events if isinstance(e, EngineError)]
    if errors:
        raise SystemExit(f"bench_side_by_side: {errors[0]}")
    ends = [start] + [t for t, e in events if isinstance(e, GenerationDone)][len(sides) - 1::len(sides)]
    print(f"order {args.order}: seconds per side-by-side turn "
          f"{', '.join(f'{b - a:.2f}' for a, b in zip(ends, ends[1:]))}")

if __name__ == "__main__":
    main()
