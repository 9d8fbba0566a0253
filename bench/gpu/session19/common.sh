# Sourced by ops.sh and next.sh: MLX staged (on the GPU machine), and row() for one bench_gpu.py row per process.
set -o pipefail
: "${OUT:?set OUT (the device machine sets it)}"
[ -n "$BENCH_GPU_SMOKE" ] || source .g2/stage2.sh > /dev/null || exit 1
export PYTHONUNBUFFERED=1
ptx() { find /tmp/mlx -name "*.ptx" 2>/dev/null | wc -l; }  # MLX's cached CUDA kernels (/tmp/mlx/<version>/ptx)
row() {  # row ROW OUTNAME TIMEOUT [env ARGS...]: one bench_gpu.py row, its line, its seconds and the PTX cache
  local t0=$SECONDS
  env "${@:4}" timeout $3 python3 bench/bench_gpu.py --only $1 --budget $(($3 - 10)) --out $OUT/$2 2>&1 \
    | grep "^$1:" | cut -c1-160
  echo "  ($2: $((SECONDS - t0)) s, $(ptx) PTX files cached)"
}
stage_peers() {  # the peers' wheels (unsloth, peft, liger...) on the GPU machine, once per machine
  [ -n "$BENCH_GPU_SMOKE" ] || [ -d /root/peer_wheels ] || bash .g3/stage3.sh | tail -1
}
