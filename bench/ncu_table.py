#!/usr/bin/env python3
"""Where one profiled step's GPU time goes, from ncu's CSV: kernels grouped by name and by kind.

    PROBE_PROFILE=1 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python3 bench/probe_gpu.py --probe base:all@2 > step.csv
    python3 bench/ncu_table.py step.csv [--top 30]

ncu replays each kernel alone, so the sum is kernel time with no overlap and no launch gaps: what the step
would cost if the GPU never waited. The kinds are guesses from the kernel names (cuBLAS's Hopper GEMMs are
"nvjet_*" or "sm90_xmma_*", MLX's fused element-wise kernels carry their graph's op names).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from collections import defaultdict

UNITS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3}
KINDS = [("gemm", r"gemm|xmma|nvjet|cutlass|cublas|matmul"), ("attention", r"flash|sdpa|attention|fmha|cudnn"),
         ("reduce", r"reduce|row_reduce|col_reduce|all_reduce|softmax|logsumexp|norm"),
         ("copy", r"copy|memcpy|memset|fill|gather|scatter"), ("random", r"philox|random|bernoulli|bits")]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "element-wise / other")


def read(text: str) -> list[tuple[str, float]]:
    """(kernel name, ms) per launch, from ncu's details page (one row per metric)."""
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith('"ID"'))
    rows = []
    for r in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            value = float(r["Metric Value"].replace(",", ""))
            rows.append((r["Kernel Name"], value * UNITS.get(r.get("Metric Unit", "ns"), 1e-6)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    rows = read(open(a.csv, encoding="utf-8", errors="replace").read())
    total = sum(ms for _, ms in rows)
    by_name: dict[str, list[float]] = defaultdict(list)
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in rows:
        by_name[name].append(ms)
        by_kind[kind(name)] += ms
    print(f"{len(rows)} kernel launches, {total:.2f} ms of kernel time\n")
    for k, ms in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"  {k:<22}{ms:9.2f} ms {ms / total:6.1%}")
    print(f"\n{'ms':>8}{'share':>7}{'n':>5}{'mean us':>9}  kernel")
    for name, ms in sorted(by_name.items(), key=lambda x: -sum(x[1]))[:a.top]:
        s = sum(ms)
        print(f"{s:8.2f}{s / total:7.1%}{len(ms):5}{s / len(ms) * 1e3:9.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
