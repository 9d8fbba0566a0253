#!/bin/bash
# Is the e2e gap Python's garbage collector over the app's larger heap? lora-tui train at the default limit with
# the collector's time per step, then with gc.freeze() after the first step. After peers.sh (warm machine).
source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
for freeze in "" 1; do
  BENCH_GC_FREEZE=$freeze BENCH_TIMES=$OUT/host_times_gc$freeze.txt timeout 280 python3 bench/bench_gpu_e2e.py \
    --targets ${1:-all} --steps 40 --every 1000 --out $OUT/gc$freeze 2>&1 | grep -v "^round" | tail -2
done
