#!/bin/bash
# Nineteenth session: MLX's CUDA graph size (MLX_MAX_OPS_PER_BUFFER; H100 default 100) across the rows, one
# bench_gpu.py row per process at the automatic limit, on a warm machine after stage1 (carry [".g2"]).
#   bash bench/gpu/session19/ops.sh ROW:OPS ...     e.g. mlx+ckpt:all:20 mlx:100
# OPS 0 leaves the variable unset. In the session's calls that was MLX's default (100 on an H100); since
# engine/cuda_graphs.py the engine sets 10 on CUDA when unset, so MLX's default is now OPS 100 here.
[ -n "$BENCH_GPU_SMOKE" ] || source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
for spec in "$@"; do
  row=${spec%:*}; ops=${spec##*:}
  name=$(echo "${row}_ops$ops" | tr '+:' 'p_')  # no '+' or ':' in names: $OUT keeps plain names only
  if [ "$ops" = 0 ]; then unset MLX_MAX_OPS_PER_BUFFER; else export MLX_MAX_OPS_PER_BUFFER=$ops; fi
  timeout 100 python3 bench/bench_gpu.py --only $row --budget 90 --out $OUT/$name 2>&1 | grep "^$row:" \
    | sed "s/^/ops=$ops /" | cut -c1-160
done
