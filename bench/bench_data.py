#!/usr/bin/env python3
"""Dataset validation + tokenization throughput on N synthetic conversations (default 100k).

Target (issue 2): 100k conversations validated and tokenized in under a minute on this 2-core machine,
in bounded memory. Prints conversations/s, tokens/s and peak RSS growth.

  uv run python bench/bench_data.py [--count 100000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  (preloads the BLAS before mlx)
from engine.config.schema import Config  # noqa: E402
from engine.data import validate_dataset  # noqa: E402
from engine.model.loading import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_data.py"), "--out", tmp,
                        "--count", str(args.count), "--heldout", "1"], check=True, stdout=subprocess.DEVNULL)
        path = Path(tmp) / "tool_calls.jsonl"
        size_mb = path.stat().st_size / 1e6
        tokenizer = load_tokenizer(Config().model)
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        peak = [rss0]

        def progress(done, total):
            peak[0] = max(peak[0], proc.memory_info().rss)

        t0 = time.perf_counter()
        report, _ = validate_dataset(path, tokenizer, progress=progress)
        dt = time.perf_counter() - t0
    tokens = sum(report.lengths)
    print(f"file: {args.count} conversations, {size_mb:.0f} MB")
    print(f"validated+tokenized {report.valid} conversations in {dt:.1f} s: "
          f"{report.valid / dt:,.0f} conversations/s, {tokens / dt:,.0f} tokens/s")
    print(f"RSS growth during the run: {(peak[0] - rss0) / 1e6:.0f} MB (file is {size_mb:.0f} MB)")
    print(f"target < 60 s: {'PASS' if dt < 60 else 'FAIL'}  (cpus={os.cpu_count()})")


if __name__ == "__main__":
    main()
