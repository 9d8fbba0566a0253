#!/bin/bash
# For the next GPU session (issue 22), on a fresh machine after `bash .g1/stage1.sh` (carry [".g1"]), each part
# one call (carry [".g2", ".g3"]):
#   bash bench/gpu/session21/next.sh a     (a) q/v against the compiled PEFT in the same call: last measured side by
#                                          side at MLX's 100 ops a graph (sixteenth session, 0.99x); ~4 min
#   bash bench/gpu/session21/next.sh d     (d) 4-bit all seven against Unsloth 4-bit in the same call at the
#                                          engine's 10 ops (the 0.90x of the nineteenth session was at 100); ~5 min
#   bash bench/gpu/session21/next.sh ops5  all seven + ckpt at 10 and 5 ops a graph, alternating: whether smaller
#                                          graphs lower the peak further (10 took 0.6 GB off 100's); ~3 min warm
#   bash bench/gpu/session21/next.sh dora  (carry [".g4b"], after the embedded GGUF's first half: README) whether
#                                          dropout reaches DoRA's adapters on CUDA (bench/probe_dora_dropout.py)
#   bash bench/gpu/session21/next.sh dora-random  (carry [".g2"]) the same probe on a random Llama of the embedded
#                                          model's shape: no GGUF, so one call (~3 min; its first process
#                                          compiles MLX's kernels on a fresh machine)
# The first MLX row of a fresh machine compiles MLX's kernels (~110 s), hence its longer timeout.
if [ "$1" = dora ]; then  # carries .g4b only (.g2 would not fit beside it): MLX from an earlier call's stage2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  [ -d /tmp/site/mlx ] || { echo "no MLX in /tmp/site: first a call with carry .g2: source .g2/stage2.sh" >&2; exit 2; }
  gguf=/root/.cache/lora-tui/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$(dirname $gguf)" && { [ -f $gguf ] || cat /root/gg/gg_aa .g4b/gg_ab .g4b/gg_ac > $gguf; } || exit 1
  for spec in "dora keep" "dora dequantize" "lora keep" "lora dequantize"; do
    timeout 200 python3 bench/probe_dora_dropout.py $spec 2>&1 | tail -1
  done
  MLX_ENABLE_TF32=0 timeout 300 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_train.py \
    -k "checkpointed" 2>&1 | grep -E "^E  |passed|failed" | head -8  # float32 bounds: full float32 products
  exit
fi
source bench/gpu/session19/common.sh
case "$1" in
  a) row mlx qv_1 200
     stage_peers
     row torch-compile peer_compile_qv 200
     row mlx qv_2 80 ;;
  d) row mlx-4bit:all q4_1 200
     stage_peers
     row unsloth-4bit:all peer_unsloth4_all 260
     row mlx-4bit:all q4_2 80
     row mlx-4bit:all q4_h105 80 BENCH_QUEUE_HEADROOM=1.05 ;;  # the 2.25 GB / 1.5% trade, last timed at 100 ops
  dora-random) for spec in "dora keep" "dora dequantize" "lora keep" "lora dequantize"; do  # no GGUF needed
                 timeout 200 python3 bench/probe_dora_dropout.py $spec random 2>&1 | tail -1
               done ;;
  ops5) row mlx+ckpt:all warm 200
        for run in 1 2; do
          row mlx+ckpt:all all_ops10_$run 80 MLX_MAX_OPS_PER_BUFFER=10
          row mlx+ckpt:all all_ops5_$run 80 MLX_MAX_OPS_PER_BUFFER=5
        done ;;
  *) echo "usage: next.sh a|d|ops5|dora|dora-random" >&2; exit 2 ;;
esac
