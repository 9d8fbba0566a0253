#!/bin/bash
# Twentieth session: (c) q/v + checkpointing with the engine's new default limit (the estimate itself, at 10 ops
# a CUDA graph), beside the compiled PEFT, on a fresh machine after `bash .g1/stage1.sh` (carry [".g1"]):
#   bash bench/gpu/session20/next.sh cq-default   (carry [".g2", ".g3"])
#   bash bench/gpu/session20/next.sh lora-mlp     (carry [".g2"]): all seven + ckpt with the adapted MLP's own
#                                                 recompute (checkpointed_lora_mlp.py, off by default) against
#                                                 autograd's, alternating, at 1.15x and 1.05x the estimate, ~5 min
source bench/gpu/session19/common.sh
case "$1" in
  cq-default) row mlx+ckpt qv_default 200  # a fresh machine's first MLX process compiles its kernels (~100 s)
              stage_peers
              row torch-compile+ckpt peer_compile 200 ;;
  lora-mlp) row mlx+ckpt:all warm 200  # a fresh machine's first MLX process compiles its kernels
            for h in 1.15 1.05; do
              for run in 1_1 1_0 2_1 2_0; do  # run_switch: each switch twice, alternating
                on=${run#*_}
                row mlx+ckpt:all all_h${h}_mlp${on}_${run%_*} 80 BENCH_QUEUE_HEADROOM=$h BENCH_CHECKPOINTED_LORA_MLP=$on
              done
            done ;;  # at most ~520 s; ~250 s on a warm machine
  *) echo "usage: next.sh cq-default|lora-mlp" >&2; exit 2 ;;
esac
