#!/bin/bash
# Nineteenth session: MLX's CUDA graph size (MLX_MAX_OPS_PER_BUFFER; H100 default 100) across the rows, one
# bench_gpu.py row per process at the automatic limit, on a warm machine after stage1 (carry [".g2"]).
#   bash bench/gpu/session19/ops.sh ROW:OPS ...     e.g. mlx+ckpt:all:20 mlx:100 mlx:default
# OPS is a number, or `default`: the variable unset. In the session's calls that spec was written `0` and meant
# MLX's default (100 on an H100); since engine/cuda_graphs.py the engine sets 10 on Linux when it is unset, so
# MLX's default is now OPS 100. (To MLX itself 0 would mean a graph after every op.)
set -o pipefail
: "${OUT:?set OUT (the device machine sets it)}"
[ -n "$BENCH_GPU_SMOKE" ] || source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
n=0
for spec in "$@"; do
  row=${spec%:*}; ops=${spec##*:}; n=$((n + 1))
  if [ "$ops" = default ]; then unset MLX_MAX_OPS_PER_BUFFER
  elif [[ "$ops" =~ ^[0-9]+$ ]]; then export MLX_MAX_OPS_PER_BUFFER=$ops
  else echo "ops.sh: '$spec' is not ROW:OPS (OPS a number or default)" >&2; exit 2; fi
  name=$(echo "${n}_${row}_ops$ops" | tr '+:' 'p_')  # plain names come back from $OUT; the index keeps repeats
  timeout 100 python3 bench/bench_gpu.py --only $row --budget 90 --out $OUT/$name 2>&1 | grep "^$row:" \
    | sed "s/^/ops=$ops /" | cut -c1-160
done
