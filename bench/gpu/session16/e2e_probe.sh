#!/bin/bash
# Where `lora-tui train` loses ~20 ms a step to the bench step with LoRA on all seven layers (fifteenth session):
# the host's share of each step in both (BENCH_TIMES), 40 steps, no checkpoint inside. After peers.sh (warm).
source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1 BENCH_TIMES=$OUT/host_times.txt
timeout 400 python3 bench/bench_gpu_e2e.py --targets ${1:-all} --steps 40 --every 1000 --out $OUT 2>&1 | tail -4
grep -c . $OUT/host_times.txt
