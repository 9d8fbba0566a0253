#!/usr/bin/env bash
# On the GPU machine: install the wheels that .g3/stage3.sh parked in /root/peer_wheels into /tmp/site, the
# folder .g2/stage2.sh installs MLX into (same pip flags; --no-deps, so the machine's torch, transformers, peft,
# accelerate and triton stay as they are). Idempotent; safe to run again after stage2. Then:
#   export PYTHONPATH=/tmp/site   (stage2.sh, when sourced, already did)
set -e
if ! ls /root/peer_wheels/*.whl >/dev/null 2>&1; then
    echo "no /root/peer_wheels/*.whl: run .g3/stage3.sh first (a fresh machine?)" >&2
    exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /root/peer_wheels/*.whl
rm -rf /tmp/site/studio  # unsloth's web UI, absent from the slimmed wheel (kept out if an older install left it)
PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} python3 - <<'EOF'
from importlib.metadata import version
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "| " + ", ".join(
    f"{p} {version(p)}" for p in ("transformers", "peft", "accelerate", "triton", "liger-kernel", "unsloth",
                                  "unsloth_zoo", "bitsandbytes", "trl", "datasets")))
EOF
