"""Our PEFT export/import (engine/export/peft.py) against Hugging Face PEFT itself: the same base, the same adapter,
the same prompt, logits compared in float32 (max abs difference <= 1e-4).

  (a) ours -> PEFT: LoRA and DoRA adapters made with our code (random non-zero B, DoRA magnitudes moved off the
      base's norms) on q/k/v/o_proj of every layer, and a LoRA on the last 2 layers only (layers_to_transform in the
      export), exported with export_peft, loaded with PeftModel.from_pretrained on the base in transformers; compared
      with our MLX base + adapter (load_with_adapter).
  (b) PEFT -> ours: LoRA, LoRA with use_rslora, DoRA, and a LoRA on layer 0 only (we give the other layers neutral
      B = 0 adapters) made by peft itself (init_lora_weights=False so B is non-zero; DoRA magnitudes likewise moved),
      saved with save_pretrained, imported with import_peft, compared the same way.

Two bases: the embedded SmolLM2-135M-Instruct (its q/k rows are in llama.cpp's interleaved order in MLX, the adapter's
q/k output rows are permuted on the way) and the tiny HF-layout Mistral of tests/tiny_mistral.py (no permutation).

The embedded base in transformers comes from its original GGUF file (from_pretrained(dir, gguf_file=...)), which
de-permutes q/k into the Hugging Face layout by transformers' own code. Its weights are then compared with ours
(MLX's, q/k put in HF order with llama.cpp's inverse permutation): they agree to the Q4_1 dequantization's rounding
(MLX dequantizes in float16, gguf-py in float32: <= 4e-3 here, while q/k left in MLX order differ by >= 1.5), which
shows the layouts agree. For a 1e-4 comparison of logits both sides then need the very same numbers, so the transformers
model gets our (MLX) float32 base weights in that HF order before any adapter is applied.

Two interpreters: this file runs in bench/.venv-trl (torch, transformers, peft; gitignored) and calls itself through
the project's venv (.venv/bin/python bench/check_peft.py --mlx ...) for everything MLX: building and exporting our
adapters, importing peft's, and our logits. Files pass through a temp folder (or --work DIR).

    bench/.venv-trl/bin/python -m pip install peft gguf
    MKL_NUM_THREADS=1 OMP_NUM_THREADS=1 bench/.venv-trl/bin/python bench/check_peft.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLX_PYTHON = ROOT / ".venv" / "bin" / "python"
PROMPT = "The capital of France is Paris, and the capital of Germany is"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOLERANCE = 1e-4
OURS_KINDS = {"lora": (False, -1), "dora": (True, -1), "lora_last2": (False, 2)}  # (use_dora, num_layers)
THEIRS_KINDS = {"lora": {}, "lora_rslora": {"use_rslora": True}, "dora": {"use_dora": True},
                "lora_layer0": {"layers_to_transform": [0], "layers_pattern": "layers"}}


# ------------------------------------------------------------------------------------- MLX side (project venv)

def mlx_config(base: str, work: Path):
    from engine.config.schema import Config
    cfg = Config()
    cfg.model.name = base if base == "embedded" else str(work / "tiny-mistral")
    cfg.model.dtype = "float32"
    return cfg


def mlx_logits(cfg, adapter, ids) -> "np.ndarray":
    import mlx.core as mx
    import numpy as np

    from engine.model.adapters import load_with_adapter
    model, _, _ = load_with_adapter(cfg, adapter)
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


def mlx_prepare(base: str, work: Path) -> None:
    """The base's ids, logits and float32 weights; our adapters, exported; our logits with each."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from engine.export.peft import export_peft
    from engine.model.adapters import adapter_weights, apply_lora, save_adapters
    from engine.model.loading import load_model
    if base != "embedded":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_mistral import make_tiny_mistral
        make_tiny_mistral(work / "tiny-mistral")
    cfg = mlx_config(base, work)
    model, tokenizer, _ = load_model(cfg.model)
    ids = tokenizer.encode(PROMPT)
    np.save(work / "ids.npy", np.array(ids))
    np.save(work / "base_logits.npy", np.array(model(mx.array(ids)[None])[0]))
    mx.save_safetensors(str(work / "base_weights.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((Path(model_path(cfg)) / "config.json").read_text())
    (work / "base_config.json").write_text(json.dumps(config))
    for kind, (use_dora, num_layers) in OURS_KINDS.items():
        cfg.lora.rank, cfg.lora.alpha, cfg.lora.use_dora = 8, 16.0, use_dora
        cfg.lora.target_modules, cfg.lora.num_layers = TARGETS, num_layers
        model, _, _ = load_model(cfg.model)
        mx.random.seed(1)  # A's initialisation too
        acfg = apply_lora(model, cfg.lora, lean=False)
        moved = {k: (mx.random.normal(v.shape) * 0.02 if k.endswith("lora_b") else
                     v * (1 + 0.1 * mx.random.normal(v.shape)) if k.endswith(".m") else v)
                 for k, v in adapter_weights(model).items()}
        model.load_weights(list(moved.items()), strict=False)
        save_adapters(model, acfg, work / f"ours_{kind}")
        export_peft(cfg, work / f"ours_{kind}", work / f"ours_{kind}_peft")
        np.save(work / f"ours_{kind}_mlx.npy", mlx_logits(cfg, work / f"ours_{kind}", ids))


def model_path(cfg) -> str:
    from engine.model.loading import resolve_model_path
    return str(resolve_model_path(cfg.model))


def mlx_import(base: str, work: Path) -> None:
    """peft's adapters imported with import_peft; our logits with each."""
    import numpy as np

    from engine.export.peft import import_peft
    cfg = mlx_config(base, work)
    ids = np.load(work / "ids.npy").tolist()
    for kind in THEIRS_KINDS:
        print(json.dumps(import_peft(cfg, work / f"theirs_{kind}_peft", work / f"theirs_{kind}")))
        np.save(work / f"theirs_{kind}_mlx.npy", mlx_logits(cfg, work / f"theirs_{kind}", ids))


def mlx_versions(work: Path) -> None:
    import mlx.core as mx
    import mlx_lm
    (work / "mlx_versions.json").write_text(json.dumps({"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}))


# ------------------------------------------------------------------------------------- torch side (bench venv)

def run_mlx(step: str, base: str, work: Path) -> None:
    env = dict(os.environ, MKL_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([str(MLX_PYTHON), __file__, "--mlx", step, base, str(work)], check=True, env=env, cwd=ROOT)


def to_hf_rows(w, heads: int):
    """llama.cpp's interleaved q/k rows -> Hugging Face's rotate-half rows (inverse of convert_hf_to_gguf.permute)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_base(base: str, work: Path):
    """The base in transformers (float32) holding exactly our MLX base weights, in HF layout."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    if base != "embedded":  # already in HF layout, and in float32
        return AutoModelForCausalLM.from_pretrained(work / "tiny-mistral", dtype=torch.float32).eval(), {}
    raw = load_file(str(work / "base_weights.safetensors"))
    config = json.loads((work / "base_config.json").read_text())
    gguf = Path(subprocess.run([str(MLX_PYTHON), "-c", "from engine.model.embedded import gguf_path; "
                                "print(gguf_path())"], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.strip())
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    qk = {name: heads[name.rsplit(".", 2)[-2]] for name in raw if name.rsplit(".", 2)[-2] in heads}
    ours = {name: to_hf_rows(w, qk[name]) if name in qk else w for name, w in raw.items()}
    theirs = model.state_dict()
    layout = {"permuted_qk_max_diff": 0.0, "raw_qk_min_of_max_diff": float("inf"), "other_max_diff": 0.0}
    for name, w in ours.items():
        diff = (theirs[name] - w).abs().max().item()
        if name in qk:
            unpermuted = (theirs[name] - raw[name]).abs().max().item()
            layout["permuted_qk_max_diff"] = max(layout["permuted_qk_max_diff"], diff)
            layout["raw_qk_min_of_max_diff"] = min(layout["raw_qk_min_of_max_diff"], unpermuted)
        else:
            layout["other_max_diff"] = max(layout["other_max_diff"], diff)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model, layout


def logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].float().numpy()


def make_theirs(base_model, kind: str, options: dict, out: Path, ids):
    """A random peft adapter on the base, saved; its logits."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False,
                     task_type="CAUSAL_LM", **options)
    model = get_peft_model(copy.deepcopy(base_model), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)  # init_lora_weights=False's B moves the logits by a lot: keep it to a fine-tune's size
            if "lora_magnitude_vector" in name:  # else DoRA's magnitude is the base's norm exactly
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out)
    return logits(model, ids)


def check_base(base: str, work: Path, rows: list) -> None:
    import copy

    import numpy as np
    from peft import PeftModel
    run_mlx("prepare", base, work)
    ids = np.load(work / "ids.npy").tolist()
    model, layout = hf_base(base, work)
    mlx_base = np.load(work / "base_logits.npy")
    base_logits = logits(model, ids)
    rows.append((base, "base (no adapter)", float(np.abs(base_logits - mlx_base).max()), None))
    if layout:
        print(f"{base}: transformers' GGUF weights vs ours in HF order: q/k {layout['permuted_qk_max_diff']:.2e}, "
              f"others {layout['other_max_diff']:.2e}; q/k left in MLX order: >= "
              f"{layout['raw_qk_min_of_max_diff']:.2f} (so the layouts agree, up to dequantization rounding)")
    for kind in OURS_KINDS:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), work / f"ours_{kind}_peft").eval()
        got = logits(peft_model, ids)
        want = np.load(work / f"ours_{kind}_mlx.npy")
        rows.append((base, f"ours -> PEFT, {kind}", float(np.abs(got - want).max()),
                     float(np.abs(want - mlx_base).max())))
    theirs = {kind: make_theirs(model, kind, options, work / f"theirs_{kind}_peft", ids)
              for kind, options in THEIRS_KINDS.items()}
    run_mlx("import", base, work)
    for kind, got in theirs.items():
        want = np.load(work / f"theirs_{kind}_mlx.npy")
        rows.append((base, f"PEFT -> ours, {kind}", float(np.abs(got - want).max()),
                     float(np.abs(got - base_logits).max())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="folder for the files passed between the two sides (default: a temp one)")
    parser.add_argument("--mlx", nargs=3, metavar=("STEP", "BASE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mlx:
        import engine  # noqa: F401  (the BLAS preload, before mlx)
        step, base, work = args.mlx
        {"prepare": mlx_prepare, "import": mlx_import, "versions": lambda b, w: mlx_versions(w)}[step](base, Path(work))
        return 0

    import peft
    import torch
    import transformers
    torch.set_num_threads(1)
    start = time.time()
    root = Path(args.work or tempfile.mkdtemp(prefix="check_peft_"))
    rows = []
    for base in ("embedded", "tiny-mistral"):
        (root / base).mkdir(parents=True, exist_ok=True)
        check_base(base, root / base, rows)
    run_mlx("versions", "-", root)
    versions = json.loads((root / "mlx_versions.json").read_text())
    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"mlx {versions['mlx']}, mlx-lm {versions['mlx_lm']}; {time.strftime('%Y-%m-%d')}; "
          f"{time.time() - start:.0f} s; files in {root}")
    print(f"{'base':<14}{'case':<28}{'max |logit diff|':>18}{'adapter moves logits by':>26}")
    for base, case, diff, moved in rows:
        print(f"{base:<14}{case:<28}{diff:>18.2e}{'' if moved is None else f'{moved:.3f}':>26}")
    ok = all(diff <= TOLERANCE for _, _, diff, _ in rows) and all(m is None or m > 0.01 for *_, m in rows)
    print(f"{'PASS' if ok else 'FAIL'}: every max abs logit difference <= {TOLERANCE:g} "
          "(and every adapter moves the logits by > 0.01)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
