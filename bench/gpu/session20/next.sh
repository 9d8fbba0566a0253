#!/bin/bash
# Twentieth session: (c) q/v + checkpointing with the engine's new default limit (the estimate itself, at 10 ops
# a CUDA graph), beside the compiled PEFT, on a fresh machine after `bash .g1/stage1.sh` (carry [".g1"]):
#   bash bench/gpu/session20/next.sh cq-default   (carry [".g2", ".g3"])
source bench/gpu/session19/common.sh
case "$1" in
  cq-default) row mlx+ckpt qv_default 200  # a fresh machine's first MLX process compiles its kernels (~100 s)
              [ -n "$BENCH_GPU_SMOKE" ] || [ -d /root/peer_wheels ] || bash .g3/stage3.sh | tail -1
              row torch-compile+ckpt peer_compile 200 ;;
  *) echo "usage: next.sh cq-default" >&2; exit 2 ;;
esac
