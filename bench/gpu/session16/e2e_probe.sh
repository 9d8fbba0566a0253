#!/bin/bash
# Where `lora-tui train` loses ~20 ms a step to the bench step with LoRA on all seven layers (fifteenth session):
# the host's share of each step in both (BENCH_TIMES), 40 steps, no checkpoint inside; then lora-tui again with a
# memory limit far above its estimate (does the limit throttle look-ahead?). After peers.sh (warm machine).
source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
for limit in ${LIMITS:-0 70}; do
  BENCH_TIMES=$OUT/host_times_$limit.txt timeout 280 python3 bench/bench_gpu_e2e.py --targets ${1:-all} --steps 40 \
    --every 1000 --memory-limit-gb $limit $E2E_ARGS --out $OUT/limit$limit 2>&1 | tee $OUT/e2e_$limit.log | grep -v "^round" | tail -2
done
