#!/bin/bash
# Run on this CPU before spending device time: each part of next.sh at the smoke shape (BENCH_GPU_SMOKE=1), so a
# broken probe fails here, not in a GPU call (the eighteenth session's first call failed that way). The peers'
# variants are only listed: they need torch, which the CPU environment does not have.
# Needs the smoke checkpoint (/tmp/bench_gpu_models/mistral-d256-l2-m512-v1024; bench/.venv-torch writes it).
set -e
cd "$(dirname "$0")/../../.."
export BENCH_GPU_SMOKE=1 PYTHONUNBUFFERED=1
scripts/run python bench/bench_gpu.py --only mlx+ckpt torch-compile+ckpt unsloth+ckpt --list | tail -1
for h in 1.15 3; do
  BENCH_QUEUE_HEADROOM=$h scripts/run python bench/bench_gpu.py --only mlx+ckpt:all --budget 120 --out /tmp/preflight \
    | grep "^mlx+ckpt:all:" | cut -c1-120
done
scripts/run python bench/gpu/session17/e2e_bisect.py --steps 2 --rounds 1 --more | grep -v "^step" | tail -3
echo "preflight: ok"
