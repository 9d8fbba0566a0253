#!/usr/bin/env python3
"""Estimated data-parallel scaling of lora-tui over 2, 4 and 8 machines, from measured step times and the
adapter's gradient size.

  scripts/run python bench/bench_scaling.py

Each optimizer step, every rank sums the adapter gradients (plus two scalars) with a ring all-reduce,
after its backward pass (no overlap): t_comm = 2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency, and with
the per-rank batch fixed (weak scaling) efficiency = t_step / (t_step + t_comm). Step times come from
this repository's measurements (bench/cpu.json, bench/gpu/run3.json); link figures are stated below.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Effective TCP throughput and per-hop latency (assumptions, not measured here): 10 GbE at ~90% of line
# rate; Thunderbolt 4 IP networking between Macs as commonly reported by iperf (~20 Gb/s); Thunderbolt 5.
LINKS = {"10 GbE": (1.1e9, 50e-6), "Thunderbolt 4": (2.5e9, 30e-6), "Thunderbolt 5": (6.0e9, 30e-6)}


def lora_params(layers: int, targets: dict[str, tuple[int, int]], rank: int) -> int:
    return layers * sum(rank * (i + o) for i, o in targets.values())


def jobs() -> list[dict]:
    out = []
    # The reference job's shapes: Mistral-7B (hidden 4096, 8 KV heads of 128), LoRA r16 on q and v.
    mistral = lora_params(32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)}, 16)
    gpu = json.loads((ROOT / "bench" / "gpu" / "run3.json").read_text())["results"]["mlx"]
    out.append({"job": "Mistral-7B shape, batch 2 x 2048, bf16, H100 (bench_gpu.py)", "params": mistral,
                "step_s": gpu["step_s"]})
    # A Mac's GPU is far slower on the same job: we measured 694 TFLOP/s of bf16 matmul on the H100 and
    # an M2 Max-class GPU offers ~14 TFLOP/s of fp16, so x50 (an estimate: read your own steps/s in the log).
    out.append({"job": "same job on an M-series Mac (H100 step x 50, estimated)", "params": mistral,
                "step_s": gpu["step_s"] * 50})
    cpu_path = ROOT / "bench" / "cpu.json"
    if cpu_path.exists():
        cpu = json.loads(cpu_path.read_text())
        if "train" in cpu:
            run = max(cpu["train"]["lora_tui"], key=lambda r: r["tokens_per_sec"])
            # SmolLM2-135M: hidden 576, 3 KV heads of 64, 30 blocks; LoRA r16 on q and v.
            small = lora_params(30, {"q_proj": (576, 576), "v_proj": (576, 192)}, 16)
            tokens = 4 * 350  # batch 4 of the sample dataset's conversations, ~350 tokens each
            out.append({"job": f"embedded SmolLM2-135M, batch 4, float32, this 2-core CPU (bench_cpu.py)",
                        "params": small, "step_s": tokens / run["tokens_per_sec"]})
    return out


def main() -> None:
    rows = []
    for job in jobs():
        grad_bytes = job["params"] * 4  # float32 adapter gradients
        print(f"{job['job']}: {job['params']:,} adapter parameters = {grad_bytes / 1e6:.1f} MB of gradients "
              f"per step, step {job['step_s']:.2f} s")
        for link, (bandwidth, latency) in LINKS.items():
            cells = []
            for n in (2, 4, 8):
                comm = 2 * (n - 1) / n * grad_bytes / bandwidth + 2 * (n - 1) * latency
                eff = job["step_s"] / (job["step_s"] + comm)
                cells.append(f"{n} machines {eff:.0%} ({comm * 1000:.0f} ms)")
                rows.append({"job": job["job"], "link": link, "machines": n, "efficiency": round(eff, 3),
                             "comm_ms": round(comm * 1000, 1)})
            print(f"  {link:14s} " + "; ".join(cells))
    (ROOT / "bench" / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
