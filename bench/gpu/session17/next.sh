#!/bin/bash
# The next GPU session's calls (bench/gpu/session17/README.md), after `bash .g1/stage1.sh` (carry [".g1"]):
#   bash bench/gpu/session17/next.sh bisect      (carry [".g2"]): the batch upload in one process, ~4 min
#   bash bench/gpu/session17/next.sh e2e         (carry [".g2"]): lora-tui train against the bench, equal windows
#   bash bench/gpu/session17/next.sh ckpt-limit  (carry [".g2", ".g3"]): (c) q/v at lower memory limits + the peer
source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
case "$1" in
  bisect) timeout 560 python3 bench/gpu/session17/e2e_bisect.py --targets all --steps 30 --rounds 2 --more \
            --out $OUT 2>&1 | grep -v "^step\|^\s*$\|Writing" | tail -24 ;;
  e2e) for t in all qv; do
         timeout 270 python3 bench/bench_gpu_e2e.py --targets $t --steps 40 --every 1000 --rounds 2 --same-window \
           --lora-tui-first --out $OUT 2>&1 | grep -v "^round\|Writing" | tail -2
       done ;;
  ckpt-limit) [ -d /root/peer_wheels ] || bash .g3/stage3.sh | tail -1
       for h in 1.0 1.05; do
         BENCH_QUEUE_HEADROOM=$h timeout 120 python3 bench/bench_gpu.py --only mlx+ckpt --budget 110 --out $OUT/h$h \
           2>&1 | grep "^mlx+ckpt:" | cut -c1-200
       done
       timeout 200 python3 bench/bench_gpu.py --only torch-compile+ckpt --budget 190 --out $OUT/peer 2>&1 | \
         grep "^torch-compile+ckpt:" | cut -c1-200 ;;
  *) echo "usage: next.sh bisect|e2e|ckpt-limit" >&2; exit 2 ;;
esac
