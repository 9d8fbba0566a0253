#!/bin/bash
# The next GPU session's calls (bench/gpu/session18/README.md), after `bash .g1/stage1.sh` (carry [".g1"]):
#   bash bench/gpu/session18/next.sh cq      (carry [".g2", ".g3"]): (c) q/v at the new 1.05x default beside the
#                                            compiled PEFT and Unsloth, in one call, ~5 min
#   bash bench/gpu/session18/next.sh c-all   (carry [".g2"]): (c) all seven at higher limits (1.15x, 1.3x, none):
#                                            is the 0.87x against Unsloth MLX's throttle? ~4 min
#   bash bench/gpu/session18/next.sh d       (carry [".g2", ".g3"] on a fresh machine): (d) 4-bit all seven at
#                                            limits of 1.15x, 1.0x, 1.05x the estimate beside Unsloth 4-bit, ~5 min
#   bash bench/gpu/session18/next.sh bisect  (carry [".g2"]): session17's in-process bisect, with queue-feed
source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
case "$1" in
  cq) [ -d /root/peer_wheels ] || bash .g3/stage3.sh | tail -1
      timeout 100 python3 bench/bench_gpu.py --only mlx+ckpt --budget 90 --out $OUT/ours 2>&1 | grep "^mlx+ckpt:" | cut -c1-200
      for p in torch-compile+ckpt unsloth+ckpt; do
        timeout 200 python3 bench/bench_gpu.py --only $p --budget 190 --out $OUT/$p 2>&1 | grep "^$p:" | cut -c1-200
      done  # ours again after the peers: the bench spreads 3-5% between runs
      timeout 100 python3 bench/bench_gpu.py --only mlx+ckpt --budget 90 --out $OUT/ours2 2>&1 | grep "^mlx+ckpt:" | cut -c1-200 ;;
  c-all) for h in 1.15 1.3 3; do
           BENCH_QUEUE_HEADROOM=$h timeout 100 python3 bench/bench_gpu.py --only mlx+ckpt:all --budget 90 \
             --out $OUT/all_h$h 2>&1 | grep "^mlx+ckpt:all:" | cut -c1-200
         done  # smaller CUDA graphs: less of the open graph's dead inputs counted over the limit (ninth session)
         MLX_MAX_OPS_PER_BUFFER=20 timeout 100 python3 bench/bench_gpu.py --only mlx+ckpt:all --budget 90 \
           --out $OUT/all_h1.15_ops20 2>&1 | grep "^mlx+ckpt:all:" | cut -c1-200 ;;
  d) [ -d /root/peer_wheels ] || bash .g3/stage3.sh | tail -1  # (d) 4-bit all seven: lower limits beside Unsloth
     for h in 1.15 1.0; do
       BENCH_QUEUE_HEADROOM=$h timeout 100 python3 bench/bench_gpu.py --only mlx-4bit:all --budget 90 \
         --out $OUT/q4_h$h 2>&1 | grep "^mlx-4bit:all:" | cut -c1-200
     done
     timeout 240 python3 bench/bench_gpu.py --only unsloth-4bit:all --budget 230 --out $OUT/unsloth4 2>&1 \
       | grep "^unsloth-4bit:all:" | cut -c1-200
     BENCH_QUEUE_HEADROOM=1.05 timeout 100 python3 bench/bench_gpu.py --only mlx-4bit:all --budget 90 \
       --out $OUT/q4_h1.05 2>&1 | grep "^mlx-4bit:all:" | cut -c1-200 ;;
  bisect) timeout 560 python3 bench/gpu/session17/e2e_bisect.py --targets all --steps 30 --rounds 2 --more \
            --out $OUT 2>&1 | grep -v "^step\|^\s*$\|Writing" | tail -24 ;;
  *) echo "usage: next.sh cq|c-all|d|bisect" >&2; exit 2 ;;
esac
