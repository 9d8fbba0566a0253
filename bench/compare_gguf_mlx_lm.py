#!/usr/bin/env python3
"""Our GGUF export against mlx-lm's (`mlx_lm.fuse --export-gguf`, the peer), same adapter, same run: export
time, file size, and what transformers' GGUF loader makes of each file (its logits on one chat prompt
against our fused MLX model's, float32). Two processes: MLX in lora-tui's venv, transformers in
bench/.venv-trl (`bench/.venv-trl/bin/python -m pip install gguf` there).

  MKL_NUM_THREADS=1 .venv/bin/python bench/compare_gguf_mlx_lm.py [--work /tmp/gguf-peer]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_PY = ROOT / "bench" / ".venv-trl" / "bin" / "python"
PROMPT = [{"role": "user", "content": "What's the weather like in Lisbon right now?"}]

TRANSFORMERS_SIDE = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
job = json.loads(sys.argv[1])
out = {}
for name, path in job["files"].items():
    try:
        model = AutoModelForCausalLM.from_pretrained(str(__import__("pathlib").Path(path).parent),
                                                     gguf_file=__import__("pathlib").Path(path).name,
                                                     torch_dtype=torch.float32)
        with torch.no_grad():
            logits = model(torch.tensor([job["ids"]])).logits[0].numpy()
        ref = np.load(job["ref"])
        out[name] = {"max_abs_diff": float(np.abs(logits - ref).max()),
                     "same_argmax": float((logits.argmax(-1) == ref.argmax(-1)).mean())}
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/gguf-peer")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import engine  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx
    import numpy as np

    from engine.config.schema import Config
    from engine.data.encode import ChatEncoder
    from engine.export.gguf import export_gguf
    from engine.model.adapters import load_with_adapter
    from engine.model.embedded import import_embedded
    from test_export_gguf import random_adapter

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    adapter, _ = random_adapter(Config(), work / "adapter")
    model, tok, _ = load_with_adapter(Config(), adapter)
    ids = tok.encode(ChatEncoder(tok).prompt_text(PROMPT), add_special_tokens=False)
    np.save(work / "ref.npy", np.asarray(model(mx.array(ids)[None])[0].astype(mx.float32)))
    del model

    t0 = time.perf_counter()
    export_gguf(Config(), adapter, work / "ours.gguf", "f16")
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(import_embedded()),
                           "--adapter-path", str(adapter), "--save-path", str(work / "fused"), "--export-gguf",
                           "--gguf-path", "mlx_lm.gguf", "--dequantize"], capture_output=True, text=True)
    peer_s = time.perf_counter() - t0
    files = {"lora-tui": str(work / "ours.gguf")}
    if peer.returncode == 0:
        files["mlx-lm"] = str(work / "fused" / "mlx_lm.gguf")
    job = json.dumps({"files": files, "ids": ids, "ref": str(work / "ref.npy")})
    read = subprocess.run([str(TRL_PY), "-c", TRANSFORMERS_SIDE, job], capture_output=True, text=True)
    result = json.loads(read.stdout.strip().splitlines()[-1]) if read.returncode == 0 else {"error": read.stderr[-500:]}
    sizes = {name: Path(path).stat().st_size for name, path in files.items()}
    print(f"lora-tui export --to gguf --quant f16: {ours_s:.1f} s, {sizes['lora-tui'] / 1e6:.1f} MB")
    print(f"mlx_lm.fuse --export-gguf --dequantize (also writes the fused safetensors): {peer_s:.1f} s"
          + (f", {sizes['mlx-lm'] / 1e6:.1f} MB" if "mlx-lm" in sizes else f", failed: {peer.stderr[-300:]}"))
    for name, r in result.items():
        print(f"transformers reads {name}'s file: {r}")
    (work / "result.json").write_text(json.dumps({"seconds": {"lora-tui": ours_s, "mlx-lm": peer_s},
                                                  "bytes": sizes, "transformers": result}, indent=2))


if __name__ == "__main__":
    main()
