#!/bin/bash
# The next GPU session's calls (bench/gpu/session19/README.md), after `bash .g1/stage1.sh` (carry [".g1"]):
#   bash bench/gpu/session19/next.sh first  (carry [".g2"]): a fresh machine's first MLX row, timed, with MLX's PTX
#                                           cache (/tmp/mlx/<version>/ptx) counted before and after; then the
#                                           checkpointed all-seven row with the engine's own graph size, ~4 min
#   bash bench/gpu/session19/next.sh cq     (carry [".g2", ".g3"]): (c) q/v at limits of 1.0x and 1.03x with 10 ops
#                                           a graph, beside the compiled PEFT, ~5 min
#   bash bench/gpu/session19/next.sh c-all  (carry [".g2", ".g3"]): (c) all seven at limits of 1.05x-1.15x with 10 ops
#                                           a graph (at 100 ops 1.03x cost 14%), beside Unsloth, ~5 min
#   bash bench/gpu/session17/next.sh e2e    (carry [".g2"]): lora-tui train against the bench with the new default
source bench/gpu/session19/common.sh
case "$1" in
  first) echo "PTX files cached before: $(ptx)"
         row mlx first 300
         row mlx+ckpt:all all_ckpt_engine 80
         row mlx+ckpt:all all_ckpt_mlx100 80 MLX_MAX_OPS_PER_BUFFER=100 ;;
  cq) stage_peers
      row mlx+ckpt qv_h1.0 80 BENCH_QUEUE_HEADROOM=1.0
      row mlx+ckpt qv_h1.03 80 BENCH_QUEUE_HEADROOM=1.03
      row torch-compile+ckpt peer_compile 200
      row mlx+ckpt qv_h1.0_b 80 BENCH_QUEUE_HEADROOM=1.0 ;;  # at most ~470 s with stage3: under a call's 600
  c-all) stage_peers
         for h in 1.05 1.1 1.15; do row mlx+ckpt:all all_h$h 80 BENCH_QUEUE_HEADROOM=$h; done
         row unsloth+ckpt:all peer_unsloth 260 ;;  # at most ~530 s with stage3 (200 s was under the bench's 210 s estimate)
  *) echo "usage: next.sh first|cq|c-all" >&2; exit 2 ;;
esac
