#!/bin/bash
# For the next GPU session (issue 22), on a fresh machine after `bash .g1/stage1.sh` (carry [".g1"]), each part
# one call (carry [".g2", ".g3"]):
#   bash bench/gpu/session21/next.sh a     (a) q/v against the compiled PEFT in the same call: last measured side by
#                                          side at MLX's 100 ops a graph (sixteenth session, 0.99x); ~4 min
#   bash bench/gpu/session21/next.sh d     (d) 4-bit all seven against Unsloth 4-bit in the same call at the
#                                          engine's 10 ops (the 0.90x of the nineteenth session was at 100); ~5 min
#   bash bench/gpu/session21/next.sh ops5  all seven + ckpt at 10 and 5 ops a graph, alternating: whether smaller
#                                          graphs lower the peak further (10 took 0.6 GB off 100's); ~3 min warm
# The first MLX row of a fresh machine compiles MLX's kernels (~110 s), hence its longer timeout.
source bench/gpu/session19/common.sh
case "$1" in
  a) row mlx qv_1 200
     stage_peers
     row torch-compile peer_compile_qv 200
     row mlx qv_2 80 ;;
  d) row mlx-4bit:all q4_1 200
     stage_peers
     row unsloth-4bit:all peer_unsloth4_all 260
     row mlx-4bit:all q4_2 80 ;;
  ops5) row mlx+ckpt:all warm 200
        for run in 1 2; do
          row mlx+ckpt:all all_ops10_$run 80 MLX_MAX_OPS_PER_BUFFER=10
          row mlx+ckpt:all all_ops5_$run 80 MLX_MAX_OPS_PER_BUFFER=5
        done ;;
  *) echo "usage: next.sh a|d|ops5" >&2; exit 2 ;;
esac
