#!/bin/bash
# Nineteenth session: MLX's CUDA graph size (MLX_MAX_OPS_PER_BUFFER; H100 default 100) across the rows, one
# bench_gpu.py row per process at the automatic limit, on a warm machine after stage1 (carry [".g2"]).
#   bash bench/gpu/session19/ops.sh ROW:OPS ...     e.g. mlx+ckpt:all:20 mlx:100 mlx:default
# OPS is a number, or `default`: the variable unset. In the session's calls that spec was written `0` and meant
# MLX's default (100 on an H100); since engine/cuda_graphs.py the engine sets 10 on Linux when it is unset, so
# MLX's default is now OPS 100. (To MLX itself 0 would mean a graph after every op.)
source bench/gpu/session19/common.sh
n=0
for spec in "$@"; do
  row=${spec%:*}; ops=${spec##*:}; n=$((n + 1))
  if [ "$ops" = default ]; then graph=(-u MLX_MAX_OPS_PER_BUFFER)
  elif [[ "$ops" =~ ^[0-9]+$ ]]; then graph=(MLX_MAX_OPS_PER_BUFFER=$ops)
  else echo "ops.sh: '$spec' is not ROW:OPS (OPS a number or default)" >&2; exit 2; fi
  row $row $(echo "${n}_${row}_ops$ops" | tr '+:' 'p_') 100 "${graph[@]}"  # plain names come back from $OUT
done
