#!/usr/bin/env bash
# Wheels for bench_gpu.py's peer variants (Liger, Unsloth, bitsandbytes) on the lent GPU machine, which has
# Python 3.12, torch, transformers, peft, accelerate and triton but no network. Run here, from the repo root:
#   bash bench/peer_wheels.sh
# It fills .g3/ (ignored by git; under 60 MiB, one device call carries 64 MiB) with:
#   - liger-kernel, unsloth, unsloth_zoo, bitsandbytes, and what unsloth / unsloth_zoo import at import time
#     that the GPU image lacks (datasets + dill + multiprocess, trl, cut_cross_entropy, msgspec), all --no-deps;
#   - two wheels slimmed, the rest of each byte for byte as on PyPI (RECORD rewritten to match; the originals'
#     sha256 in .g3/MANIFEST): unsloth without studio/ (its web UI, 26 of its 29 MB; nothing under unsloth/
#     imports it) and bitsandbytes with only its CUDA 13.x and CPU libraries (torch there is +cu130);
#   - stage3.sh: on the GPU machine it parks the wheels in /root/peer_wheels (kept while the machine stays warm)
#     and installs them into /tmp/site; bench/install_peers.sh installs them again after stage2.
# Not taken: xformers (~100+ MB, built for one torch; Unsloth then runs attention through PyTorch's SDPA),
# torchao, tyro, hf_transfer, diffusers (declared by unsloth / unsloth_zoo, not imported by the LoRA path).
set -euo pipefail
UNSLOTH=${UNSLOTH:-2026.10.9}
LIGER=${LIGER:-0.8.5}
BNB=${BNB:-0.50.2}
root=$(git rev-parse --show-toplevel)
cd "$root"
for d in .g3 .g4; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plat="--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$tmp" \
  "unsloth==$UNSLOTH" "unsloth_zoo==$UNSLOTH" "liger-kernel==$LIGER" "bitsandbytes==$BNB" \
  "datasets==4.8.5" "dill==0.4.1" "multiprocess==0.70.19" "trl==1.15.0" "cut_cross_entropy==25.1.1" \
  "msgspec==0.23.0" 2>&1 | grep -v "is ignored: it is neither" || true
rm -rf .g3 && mkdir -p .g3
(cd "$tmp" && sha256sum ./*.whl | sed 's#  \./#  #') > .g3/MANIFEST
python3 - "$tmp" .g3 <<'EOF'
"""Copy the wheels; slim unsloth (no studio/) and bitsandbytes (CUDA 13.x + CPU libraries only)."""
import shutil, sys, zipfile
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])


def keep_bnb(name: str) -> bool:
    lib = name.rsplit("/", 1)[-1]
    return not lib.startswith("libbitsandbytes_") or lib in (
        "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")


for whl in sorted(src.glob("*.whl")):
    keep = {"unsloth": lambda n: not n.startswith("studio/"), "bitsandbytes": keep_bnb}.get(whl.name.split("-")[0])
    if keep is None:
        shutil.copy(whl, dst / whl.name)
        continue
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if not keep(info.filename):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if keep(x.split(",", 1)[0])) + "\n").encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    print(f"slimmed {whl.name}: {whl.stat().st_size / 1e6:.1f} -> {(dst / whl.name).stat().st_size / 1e6:.1f} MB")
EOF
cat > .g3/stage3.sh <<'EOF'
#!/usr/bin/env bash
# On the GPU machine (carry [".g3"]): park the peer wheels outside the work tree, then install them into /tmp/site.
set -e
mkdir -p /root/peer_wheels && cp .g3/*.whl /root/peer_wheels/ && cp bench/install_peers.sh /root/peer_wheels/
bash /root/peer_wheels/install_peers.sh
EOF
chmod +x .g3/stage3.sh
du -sh .g3 && ls -la .g3
echo "On the GPU machine: run(carry=[\".g3\"], command=\"bash .g3/stage3.sh\") once the machine is warm (after stage1)."
