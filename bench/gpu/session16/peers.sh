#!/bin/bash
# The four rows of issue 22 with their fastest peer in the same call, at the engine's CUDA defaults since the
# fifteenth session (the flat update with look-ahead). After `bash .g1/stage1.sh` (carry [".g1"]), run
#   bash bench/gpu/session16/peers.sh ab    (carry [".g2", ".g3"]: 60 MB, under the 64 MiB carry limit)
#   bash bench/gpu/session16/peers.sh cd    (same warm machine; stage3 is skipped once the peers are in)
# ab: (b) all seven and (a) q/v against PEFT + regional torch.compile (the fastest peer in both, earlier calls).
# cd: (c) all seven + checkpointing and (d) 4-bit all seven against Unsloth (the fastest there).
# The sixteenth session ran ab and cd (bench/RESULTS.md); next: e2e_probe.sh with the learning-rate read moved (the
# bench beside it: `LIMITS=0 bash bench/gpu/session16/e2e_probe.sh all`, then `qv`), then cq and liger.
# Each part is ~6-7 minutes; results in $OUT/<part>/bench_gpu.json.
source .g2/stage2.sh > /dev/null || exit 1
[ -d /root/peer_wheels ] || bash .g3/stage3.sh | tail -1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
case "$1" in
  ab) rows="mlx:all torch-compile:all mlx:qv torch-compile:qv" ;;
  cd) rows="mlx+ckpt:all unsloth+ckpt:all mlx-4bit:all unsloth-4bit:all" ;;
  # Not run in the sixteenth session: (c) q/v against every peer, and Liger beside (a) and (b).
  cq) rows="mlx+ckpt torch-compile+ckpt unsloth+ckpt torch-liger+ckpt" ;;
  liger) rows="mlx:all torch-liger:all mlx:qv torch-liger:qv" ;;
  *) echo "usage: peers.sh ab|cd|cq|liger" >&2; exit 2 ;;
esac
timeout 570 python3 bench/bench_gpu.py --only $rows --budget 560 --out $OUT/$1 2>&1 | tail -25
