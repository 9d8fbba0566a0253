"""Issue 19: our GGUF export (engine/export/gguf.py) checked by programs we did not write.

A verification script, not a test. Three readers, each in its own interpreter:

1. transformers' GGUF loader (bench/.venv-trl: torch + transformers + gguf): AutoModelForCausalLM and AutoTokenizer
   `from_pretrained(folder, gguf_file=name)` on our file; greedy token ids on 5 chat prompts against our fused model
   (MLX, float32, greedy), and the logits over the prompt + our reply (teacher-forced) against ours.
2. llama.cpp through llama-cpp-python (bench/.venv-llama): the same prompts' ids, greedy (temp 0, top_k 1) through
   llama.cpp's sampler, and its logits (logits_all) against ours.
3. gguf's GGUFReader: every tensor (name, shape, type, values against our fused weights) and the metadata.

Models: the embedded SmolLM2-135M-Instruct (llama.cpp's q/k layout kept) with an adapter trained here by
`lora-tui train` (LoRA on q_proj, k_proj, v_proj, o_proj), exported at f32, f16 and q8_0; and the tiny
Hugging Face-layout Mistral of tests/tiny_mistral.py (q/k rows permuted by the exporter), base and with a random
q_proj/k_proj adapter, at f32, plus a control file written with the permutation switched off (it must NOT match:
this shows the logit comparison would catch a q/k layout error); and that tiny model as an HF llama with
attention_bias: true (llama.cpp only: a GGUF has no key telling transformers about biases), next to a copy whose
q/k biases were permuted by hand as llama.cpp's convert_hf_to_gguf.py permutes them.

llama.cpp refuses a byte-level ("gpt2") vocabulary without tokenizer.ggml.merges, and the tiny models' tokenizer has
no merges (so our file has none): llama.cpp reads a copy with one unused merge added (it is fed token ids), and the
refusal of the file as written is reported. llama.cpp runs each file twice: with an f32 KV cache (number for number
against an f32 file) and with its default f16 KV cache.

Setup (once; both venvs are git-ignored):

    bench/.venv-trl/bin/python -m pip install gguf          # torch + transformers already there
    python3 -m venv bench/.venv-llama
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF" nice -n 19 bench/.venv-llama/bin/pip install llama-cpp-python==0.3.36
    (or: bench/check_gguf.py --build-llama, which does the last two and records the build's time and outcome)

Run (2 shared cores: one thread each, niced):

    MKL_NUM_THREADS=1 OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/check_gguf.py

Writes bench/gguf_check.json; work files (run folder, GGUF files, logits) under --work (/tmp/lora-tui-gguf-check).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

for _var in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (every venv has numpy)

ROOT = Path(__file__).resolve().parent.parent
TRL_PY = ROOT / "bench" / ".venv-trl" / "bin" / "python"
LLAMA_VENV = ROOT / "bench" / ".venv-llama"
LLAMA_PY = LLAMA_VENV / "bin" / "python"
LLAMA_CPP_VERSION = "0.3.36"
OUT_JSON = ROOT / "bench" / "gguf_check.json"

GENERIC_PROMPTS = ["Hello! Who are you?", "Give me three tips for learning to cook."]
HELDOUT_IDS = ("h0000", "h0001", "h0002")
TRAIN_CONFIG = {  # small: ~40 steps on 2 cores; a high learning rate so the answers leave the base's
    "model": {"name": "embedded", "max_seq_length": 512},
    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "training": {"iterations": 40, "batch_size": 2, "grad_accumulation": 1, "learning_rate": 0.002,
                 "warmup_steps": 5, "seed": 7},
    "data": {"path": str(ROOT / "data" / "tool_calls.jsonl")},
    "checkpoints": {"every_steps": 0, "keep_last": 1, "keep_best": False},
    "evaluation": {"every_steps": 0, "val_batches": 2, "heldout_path": "", "sample_prompts": []},
}
TINY_SEQUENCE = [1, 3] + [(7 * i + 11) % 250 + 5 for i in range(40)] + [4]  # fixed ids: <s> [INST] ... [/INST]
F32_LOGIT_TOL = 1e-3  # f32 file: the same numbers in another engine's order of operations


# --------------------------------------------------------------------------------------------------------------
# Shared by every side: numpy only.

def compare(ours: np.ndarray, theirs: np.ndarray, plen: int, our_tokens: list[int], their_tokens: list[int]) -> dict:
    """Logits of one sequence (prompt + our greedy reply, teacher-forced) from us and from a reader, and the two
    greedy replies. Position p's logits predict token p + 1: the prompt's are 0..plen-1 (the last one predicts
    the first reply token)."""
    n = min(len(ours), len(theirs))
    per_pos = np.abs(ours[:n].astype(np.float64) - theirs[:n].astype(np.float64)).max(axis=1)
    first = next((i for i, (a, b) in enumerate(zip(our_tokens, their_tokens)) if a != b), None)
    if first is None and len(our_tokens) != len(their_tokens):
        first = min(len(our_tokens), len(their_tokens))
    out = {"exact": list(our_tokens) == list(their_tokens), "first_diff": first,
           "max_abs_logit_diff_prompt": float(per_pos[:plen].max()),
           "max_abs_logit_diff_last_prompt_pos": float(per_pos[plen - 1]),
           "max_abs_logit_diff_reply": float(per_pos[plen:].max()) if n > plen else None,
           "argmax_agree_prompt": float((ours[:plen].argmax(1) == theirs[:plen].argmax(1)).mean()),
           "n_ours": len(our_tokens), "n_theirs": len(their_tokens)}
    if first is not None and first < len(our_tokens) and first < len(their_tokens):
        p = plen - 1 + first  # both sides saw the same prefix up to here
        a, b = our_tokens[first], their_tokens[first]
        out["at_diff"] = {"position": p, "our_token": a, "their_token": b,
                          "our_margin": float(ours[p, a] - ours[p, b]),  # how far our choice led theirs, for us
                          "their_margin": float(theirs[p, b] - theirs[p, a]),
                          "max_abs_logit_diff_there": float(per_pos[p]) if p < n else None}
        # A legitimate divergence: a near-tie that the type's rounding (the logit error measured there) flips.
        out["near_tie"] = p < n and out["at_diff"]["our_margin"] <= 2 * per_pos[p]
    return out


def _write_json(path: Path, obj) -> None:
    import re
    text = json.dumps(obj, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    # lists of numbers on one line (token ids, shapes)
    text = re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    path.write_text(text + "\n")


# --------------------------------------------------------------------------------------------------------------
# transformers side (bench/.venv-trl)

def side_transformers(job: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    results = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "gguf": _version("gguf")}, "files": {}}
    for task in job["tasks"]:
        path = Path(task["gguf"])
        res: dict = {"label": task["label"]}
        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            model.eval()
            res["load_seconds"] = round(time.perf_counter() - t0, 2)
            res["model_class"] = type(model).__name__
        except Exception as exc:  # a reader that refuses our file is the finding
            res["error"] = f"model: {type(exc).__name__}: {exc}"
            results["files"][task["label"]] = res
            continue
        tok = None
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            res["tokenizer_class"] = type(tok).__name__
        except BaseException as exc:  # also the tokenizers library's PanicException
            if isinstance(exc, KeyboardInterrupt):
                raise
            res["tokenizer_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        cases = []
        for case in task["cases"]:
            ids, ours_toks = case["ids"], case["our_tokens"]
            c: dict = {"name": case["name"]}
            if tok is not None and case.get("messages"):
                try:
                    hf = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=True)
                    hf = hf["input_ids"] if not isinstance(hf, list) else hf
                    c["hf_tokenizer_prompt_equal"] = list(hf) == list(ids)
                    if not c["hf_tokenizer_prompt_equal"]:
                        c["hf_tokenizer_prompt_first_diff"] = next(
                            (i for i, (a, b) in enumerate(zip(hf, ids)) if a != b), min(len(hf), len(ids)))
                except Exception as exc:
                    c["hf_tokenizer_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            with torch.no_grad():
                x = torch.tensor([ids])
                gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=job["max_new"],
                                     do_sample=False, num_beams=1, eos_token_id=job["stop"][task["model"]],
                                     pad_token_id=job["stop"][task["model"]][0], temperature=None, top_p=None,
                                     top_k=None)
                theirs_toks = gen[0, len(ids):].tolist()
                logits = model(torch.tensor([ids + ours_toks])).logits[0].float().numpy()
            c["their_tokens"] = theirs_toks
            if tok is not None:
                c["their_text"] = tok.decode(theirs_toks, skip_special_tokens=True)
            c.update(compare(np.load(case["our_logits"]), logits, len(ids), ours_toks, theirs_toks))
            cases.append(c)
        res["cases"] = cases
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results["files"][task["label"]] = res
        del model
    return results


# --------------------------------------------------------------------------------------------------------------
# llama.cpp side (bench/.venv-llama)

def side_llama(job: dict) -> dict:
    """Each file twice: with an f32 KV cache (so an f32 file is compared number for number) and with llama.cpp's
    default context (f16 KV cache), as a user gets it."""
    import llama_cpp
    from llama_cpp import Llama
    results = {"versions": {"llama-cpp-python": llama_cpp.__version__}, "files": {}}
    kv_kinds = {"kv f32": {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32,
                           "flash_attn": False},
                "kv default (f16)": {}}
    results["as_exported"] = {}
    for task in job["tasks"]:
        path = Path(task.get("gguf_llama") or task["gguf"])
        if task.get("gguf_llama"):  # the file as our exporter wrote it, before the copy: does llama.cpp load it?
            proc = subprocess.run([sys.executable, "-c", "import sys; from llama_cpp import Llama; "
                                   "Llama(model_path=sys.argv[1], n_ctx=64, verbose=True)", task["gguf"]],
                                  capture_output=True, text=True)
            results["as_exported"][task["label"]] = {
                "loads": proc.returncode == 0,
                "errors": [ln for ln in proc.stderr.splitlines() if "error" in ln.lower() or "failed" in ln.lower()][:4]}
        for kv, kv_args in kv_kinds.items():
            label = f"{task['label']} [{kv}]"
            res: dict = {"label": label, "file_read": str(path)}
            t0 = time.perf_counter()
            try:
                llm = Llama(model_path=str(path), n_ctx=1024, n_threads=1, n_threads_batch=1, logits_all=True,
                            verbose=False, seed=0, **kv_args)
                res["load_seconds"] = round(time.perf_counter() - t0, 2)
            except Exception as exc:
                res["error"] = f"{type(exc).__name__}: {exc}"
                results["files"][label] = res
                continue
            meta = dict(llm.metadata)
            res["metadata"] = {k: meta.get(k) for k in ("general.architecture", "general.file_type",
                                                         "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                         "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")}
            res["n_vocab"], res["token_eos"], res["token_bos"] = llm.n_vocab(), llm.token_eos(), llm.token_bos()
            stop = set(job["stop"][task["model"]])
            cases = []
            for case in task["cases"]:
                ids, ours_toks = case["ids"], case["our_tokens"]
                c: dict = {"name": case["name"]}
                if case.get("prompt_text") is not None:
                    lt = llm.tokenize(case["prompt_text"].encode("utf-8"), add_bos=False, special=True)
                    c["llama_tokenizer_prompt_equal"] = list(lt) == list(ids)
                llm.reset()
                theirs_toks = []
                for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                    theirs_toks.append(int(t))
                    if t in stop or len(theirs_toks) >= job["max_new"]:
                        break
                llm.reset()
                llm.eval(ids + ours_toks)
                logits = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
                c["their_tokens"] = theirs_toks
                c["their_text"] = llm.detokenize([t for t in theirs_toks if t not in stop]).decode("utf-8", "replace")
                c.update(compare(np.load(case["our_logits"]), logits, len(ids), ours_toks, theirs_toks))
                cases.append(c)
            res["cases"] = cases
            res["seconds"] = round(time.perf_counter() - t0, 2)
            results["files"][label] = res
            del llm
    return results


def _version(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Our side (the project's .venv): training, export, our greedy tokens and logits, GGUFReader read-back.

def _cfg(model_name: str):
    from engine.config.loading import from_dict
    cfg, issues = from_dict({"model": {"name": model_name, "dtype": "float32", "quantized_base": "dequantize"}})
    assert not issues, issues
    return cfg


def train_adapter(work: Path, retrain: bool) -> dict:
    """`lora-tui train` on the sample data; reused when the run folder already holds its adapter."""
    import yaml
    run = work / "runs" / "trained"
    info = {"run": str(run), "config": TRAIN_CONFIG}
    if (run / "adapter" / "adapters.safetensors").is_file() and not retrain:
        info["reused"] = True
        return info | _run_summary(run)
    cfg = json.loads(json.dumps(TRAIN_CONFIG))
    cfg["output"] = {"dir": str(work / "runs"), "run_name": "trained"}
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(ROOT / ".venv" / "bin" / "lora-tui"), "-c", str(path), "train", "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    info.update(command=" ".join(cmd), seconds=round(time.perf_counter() - t0, 1), rc=proc.returncode,
                tail=(proc.stdout + proc.stderr).strip().splitlines()[-3:])
    if proc.returncode != 0:
        raise SystemExit(f"training failed: {info['tail']}")
    return info | _run_summary(run)


def _run_summary(run: Path) -> dict:
    r = json.loads((run / "report.json").read_text())
    return {"report": {k: r.get(k) for k in ("status", "step", "final_train_loss", "best_val_loss", "trainable_params",
                                             "tokens_seen", "seconds", "tokens_per_sec", "dtype")}}


def random_adapter(cfg, folder: Path, targets: list[str], seed: int = 3) -> None:
    """An adapter that really changes the model: random lora_a (as initialised) and random non-zero lora_b."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from engine.config.schema import LoRAConfig
    from engine.model.adapters import apply_lora, save_adapters
    from engine.model.loading import load_model
    model, _, _ = load_model(cfg.model)
    acfg = apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=targets), lean=False)
    mx.random.seed(seed)
    new = [(k, mx.random.normal(v.shape) * 0.3) for k, v in tree_flatten(model.trainable_parameters())
           if k.endswith("lora_b")]
    model.load_weights(new, strict=False)
    save_adapters(model, acfg, folder)


def fused_model(cfg, adapter):
    """Base (+ adapter fused, as engine/export/fuse.py fuses it), float32, dequantized."""
    from mlx.utils import tree_unflatten

    from engine.model.adapters import load_with_adapter
    from engine.model.loading import load_model
    model, tok, info = load_with_adapter(cfg, adapter) if adapter else load_model(cfg.model)
    if adapter:
        fused = [(n, m.fuse(dequantize=not info.quantized)) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(fused))
    return model, tok, info


def greedy(model, ids: list[int], max_new: int, stop: set[int]) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    out = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=max_new, sampler=lambda x: mx.argmax(x, axis=-1)):
        out.append(int(t))
        if out[-1] in stop:
            break
    return out


def logits_of(model, seq: list[int]) -> np.ndarray:
    import mlx.core as mx
    return np.asarray(model(mx.array(seq)[None])[0].astype(mx.float32))


def chat_prompts() -> list[dict]:
    rows = {}
    for line in (ROOT / "data" / "heldout.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    prompts = [{"name": i, "messages": rows[i]["messages"]} for i in HELDOUT_IDS]
    prompts += [{"name": f"chat{k}", "messages": [{"role": "user", "content": p}]}
                for k, p in enumerate(GENERIC_PROMPTS)]
    return prompts


def our_chat_side(cfg, adapter, prompts, max_new, work: Path, tag: str) -> dict:
    """Prompt ids (our chat template, our tokenizer), our greedy ids, teacher-forced logits (saved .npy), and the
    check that our loop gives what the app's reply() gives."""
    from engine.data.encode import ChatEncoder
    from engine.generate.reply import GenerationSettings, reply
    model, tok, info = fused_model(cfg, adapter)
    stop = sorted(int(t) for t in tok.eos_token_ids)
    cases = []
    for p in prompts:
        text = ChatEncoder(tok).prompt_text(p["messages"])
        ids = tok.encode(text, add_special_tokens=False)
        toks = greedy(model, ids, max_new, set(stop))
        path = work / "logits" / f"{tag}_{p['name']}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, logits_of(model, ids + toks))
        app = reply(model, tok, p["messages"], GenerationSettings(max_tokens=max_new, temperature=0.0))
        ours_text = tok.decode([t for t in toks if t not in stop]).strip()
        cases.append({"name": p["name"], "messages": p["messages"], "prompt_text": text, "ids": ids,
                      "our_tokens": toks, "our_text": ours_text, "our_logits": str(path),
                      "equals_app_reply": ours_text == app})
    return {"model": tag, "stop": stop, "dtype": info.dtype, "cases": cases}


def our_tiny_side(cfg, adapter, max_new, work: Path, tag: str) -> dict:
    model, tok, info = fused_model(cfg, adapter)
    stop = sorted(int(t) for t in tok.eos_token_ids)
    ids = list(TINY_SEQUENCE)
    toks = greedy(model, ids, max_new, set(stop))
    path = work / "logits" / f"{tag}_seq.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, logits_of(model, ids + toks))
    return {"model": tag, "stop": stop, "dtype": info.dtype,
            "cases": [{"name": "fixed_ids", "ids": ids, "our_tokens": toks, "our_logits": str(path),
                       "messages": None, "prompt_text": None}]}


def make_tiny_llama_bias(path: Path, seed: int = 1) -> Path:
    """tests/tiny_mistral.py's model as model_type llama with attention_bias: true (MLX's random, non-zero biases)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_mistral import make_tiny_mistral
    make_tiny_mistral(path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


def export(cfg, adapter, out: Path, quant: str, no_permute: bool = False) -> dict:
    import engine.export.gguf as g
    if out.exists():
        out.unlink()
    saved = g.permute_for_gguf
    if no_permute:  # the control: a file with HF's q/k rows as they are
        g.permute_for_gguf = lambda w, n_head: w
    try:
        t0 = time.perf_counter()
        res = g.export_gguf(cfg, adapter, out, quant)
        res["wall_seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        g.permute_for_gguf = saved
    return res


# --- GGUFReader read-back -------------------------------------------------------------------------------------

LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def expected_tensors(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """GGUF name -> (numpy shape, HF name), from config.json alone (not from our exporter)."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    hd = config.get("head_dim") or h // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    bias = config.get("attention_bias", False)
    out = {"token_embd.weight": ((vocab, h), "model.embed_tokens.weight"),
           "output_norm.weight": ((h,), "model.norm.weight")}
    if not config.get("tie_word_embeddings", False):
        out["output.weight"] = ((vocab, h), "lm_head.weight")
    shapes = {"attn_q": (heads * hd, h), "attn_k": (kv * hd, h), "attn_v": (kv * hd, h), "attn_output": (h, heads * hd),
              "ffn_gate": (inter, h), "ffn_up": (inter, h), "ffn_down": (h, inter), "attn_norm": (h,), "ffn_norm": (h,)}
    for i in range(config["num_hidden_layers"]):
        for g, shape in shapes.items():
            out[f"blk.{i}.{g}.weight"] = (shape, f"model.layers.{i}.{LAYER_NAMES[g]}.weight")
            if bias and g in ("attn_q", "attn_k", "attn_v", "attn_output"):
                out[f"blk.{i}.{g}.bias"] = (shape[:1], f"model.layers.{i}.{LAYER_NAMES[g]}.bias")
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows back to HF's rotate-half order (as transformers' GGUF loader does)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_back(path: Path, config: dict, quant: str, weights: dict | None, hf_layout: bool,
              source_gguf: Path | None, need_merges: bool = True) -> dict:
    """`need_merges`: the source tokenizer has BPE merges (tests/tiny_mistral.py's byte-level one has none)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    q = gguf.GGMLQuantizationType
    want_type = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q5_1": q.Q5_1, "q5_0": q.Q5_0,
                 "q4_1": q.Q4_1, "q4_0": q.Q4_0}[quant]
    expected = expected_tensors(config)
    got = {t.name: t for t in reader.tensors}
    problems = []
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        problems.append(f"missing tensors: {missing[:5]}")
    if extra:
        problems.append(f"unexpected tensors: {extra[:5]}")
    table, max_err = [], {}
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    for name, t in got.items():
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists ne0 (the row length) first
        ttype = q(int(t.tensor_type))
        table.append({"name": name, "shape": list(shape), "type": ttype.name})
        if name not in expected:
            continue
        eshape, hf = expected[name]
        if shape != eshape:
            problems.append(f"{name}: shape {shape}, expected {eshape}")
        block = gguf.GGML_QUANT_SIZES[want_type][0]
        etype = q.F32 if len(eshape) == 1 or want_type == q.F32 else (want_type if eshape[-1] % block == 0 else q.F16)
        if ttype != etype:
            problems.append(f"{name}: type {ttype.name}, expected {etype.name}")
        if weights is not None:
            data = gguf.quants.dequantize(t.data, ttype).reshape(shape).astype(np.float32)
            if hf_layout and (".attn_q." in name or ".attn_k." in name):
                data = unpermute(data, heads if ".attn_q." in name else kv)
            ref = weights[hf]
            err = float(np.abs(data - ref).max())
            scale = float(np.abs(ref).max()) or 1.0
            kind = "matrix" if len(eshape) == 2 else "vector"
            prev = max_err.get(kind, (0.0, 0.0))
            max_err[kind] = (max(prev[0], err), max(prev[1], err / scale))
    f = {k: v.contents() for k, v in reader.fields.items()}
    meta_checks = {
        "general.architecture": f.get("general.architecture") == "llama",
        "llama.context_length": f.get("llama.context_length") == config.get("max_position_embeddings"),
        "llama.embedding_length": f.get("llama.embedding_length") == config["hidden_size"],
        "llama.block_count": f.get("llama.block_count") == config["num_hidden_layers"],
        "llama.feed_forward_length": f.get("llama.feed_forward_length") == config["intermediate_size"],
        "llama.attention.head_count": f.get("llama.attention.head_count") == heads,
        "llama.attention.head_count_kv": f.get("llama.attention.head_count_kv") == kv,
        "llama.rope.dimension_count": f.get("llama.rope.dimension_count") == (config.get("head_dim")
                                                                              or config["hidden_size"] // heads),
        "llama.rope.freq_base": abs(f.get("llama.rope.freq_base", -1) - config.get("rope_theta", 10000.0)) < 1e-3,
        "llama.attention.layer_norm_rms_epsilon":
            abs(f.get("llama.attention.layer_norm_rms_epsilon", -1) - config.get("rms_norm_eps", 1e-5)) < 1e-9,
        "llama.vocab_size": f.get("llama.vocab_size") == config["vocab_size"],
        "general.file_type": "general.file_type" in f,
        "tokenizer.ggml.model": f.get("tokenizer.ggml.model") in ("gpt2", "llama"),
        "tokenizer.ggml.tokens": len(f.get("tokenizer.ggml.tokens") or []) == config["vocab_size"],
        "tokenizer.ggml.token_type": len(f.get("tokenizer.ggml.token_type") or []) == config["vocab_size"],
        "tokenizer.ggml.merges": (f.get("tokenizer.ggml.model") != "gpt2" or not need_merges
                                  or bool(f.get("tokenizer.ggml.merges"))),
        "tokenizer.ggml.bos_token_id": f.get("tokenizer.ggml.bos_token_id") == config.get("bos_token_id"),
        "tokenizer.ggml.eos_token_id": f.get("tokenizer.ggml.eos_token_id") == config.get("eos_token_id"),
        "tokenizer.chat_template": bool(f.get("tokenizer.chat_template")),
    }
    if source_gguf is not None:  # the embedded model: its tokenizer must come back exactly as the source held it
        src = {k: v.contents() for k, v in gguf.GGUFReader(str(source_gguf)).fields.items()
               if k.startswith("tokenizer.")}
        for k, v in src.items():
            meta_checks[f"{k} == source"] = f.get(k) == v
    bad_meta = [k for k, ok in meta_checks.items() if not ok]
    if bad_meta:
        problems.append(f"metadata: {bad_meta}")
    shown = {k: (v if not isinstance(v, list) else f"[{len(v)} items]") for k, v in f.items()
             if not k.startswith("GGUF.") and k != "tokenizer.chat_template"}
    return {"n_tensors": len(got), "n_expected": len(expected), "problems": problems,
            "max_abs_err_vs_our_weights": {k: {"abs": v[0], "rel_to_max": v[1]} for k, v in max_err.items()},
            "metadata": shown, "chat_template_chars": len(f.get("tokenizer.chat_template") or ""),
            "metadata_checks_failed": bad_meta, "tensors": table, "ok": not problems}


def with_one_merge(src: Path, dst: Path, permute_bias: tuple[int, int] | None = None) -> dict:
    """A copy of `src` (f32 tensors) with `tokenizer.ggml.merges` = ["<unk> <unk>"]: llama.cpp refuses a "gpt2"
    vocabulary without that key ("cannot find tokenizer merges in model file"), and tests/tiny_mistral.py's
    byte-level tokenizer has no merges, so our exporter writes none (gguf's writer skips an empty array and
    refuses to pack one). Only llama.cpp reads the copy, and it is fed token ids, so the merge is never used.
    `permute_bias` (heads, kv heads): also permute attn_q.bias / attn_k.bias as llama.cpp's converter does."""
    import gguf
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vt = gguf.GGUFValueType(f.types[0])
        w.add_key_value(key, f.contents(), vt, sub_type=gguf.GGUFValueType(f.types[-1]) if vt == gguf.GGUFValueType.ARRAY else None)
    w.add_key_value("tokenizer.ggml.merges", ["<unk> <unk>"], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    changed = []
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        data = np.array(t.data)
        if permute_bias and t.name.endswith(("attn_q.bias", "attn_k.bias")):
            heads = permute_bias[0] if "attn_q" in t.name else permute_bias[1]
            data = data.reshape(heads, 2, -1).swapaxes(1, 2).reshape(data.shape)  # convert_hf_to_gguf's permute
            changed.append(t.name)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = {t.name: t for t in gguf.GGUFReader(str(dst)).tensors}
    same = all(np.array_equal(np.array(t.data), np.array(back[t.name].data)) for t in r.tensors
               if t.name not in changed)
    return {"copy": str(dst), "other_tensors_identical": same, "added": {"tokenizer.ggml.merges": ["<unk> <unk>"]},
            "permuted_by_hand": changed}


def our_weights(cfg, adapter) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    model, _, _ = fused_model(cfg, adapter)
    return {k: np.asarray(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


# --- the other interpreters -----------------------------------------------------------------------------------

def run_side(python: Path, side: str, job: dict, work: Path) -> dict:
    job_path, out_path = work / f"job_{side}.json", work / f"result_{side}.json"
    _write_json(job_path, job)
    if out_path.exists():
        out_path.unlink()
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--side", side, "--job", str(job_path),
                           "--result", str(out_path)], capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.exists():
        return {"error": f"rc {proc.returncode}: " + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])}
    res = json.loads(out_path.read_text())
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def llama_status(work: Path) -> dict:
    build = work / "llama_build.json"
    status = json.loads(build.read_text()) if build.is_file() else {}
    if not LLAMA_PY.exists():
        return status | {"installed": False, "why": f"{LLAMA_VENV} does not exist"}
    proc = subprocess.run([str(LLAMA_PY), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return status | {"installed": False, "why": proc.stderr.strip().splitlines()[-1:]}
    return status | {"installed": True, "version": proc.stdout.strip()}


def build_llama(work: Path) -> dict:
    """Create bench/.venv-llama and build llama-cpp-python there (CPU, no BLAS, portable), at nice 19."""
    log = work / "llama_build.log"
    t0 = time.time()
    if not LLAMA_VENV.exists():
        subprocess.run(["python3", "-m", "venv", str(LLAMA_VENV)], check=True)
    env = os.environ | {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_BLAS=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    with log.open("w") as fh:
        rc = subprocess.run(["nice", "-n", "19", str(LLAMA_VENV / "bin" / "pip"), "install", "-v",
                             f"llama-cpp-python=={LLAMA_CPP_VERSION}"], stdout=fh, stderr=subprocess.STDOUT,
                            env=env).returncode
    lines = log.read_text(errors="replace").strip().splitlines()
    info = {"version_asked": LLAMA_CPP_VERSION, "build_seconds": round(time.time() - t0), "rc": rc,
            "cmake_args": env["CMAKE_ARGS"], "log": str(log), "last_lines": lines[-20:] if rc else lines[-2:]}
    _write_json(work / "llama_build.json", info)
    return info


# --------------------------------------------------------------------------------------------------------------

def main_ours(args) -> None:
    import engine  # noqa: F401  (the BLAS preload, before mlx)
    import gguf
    import mlx.core as mx
    from engine.model.embedded import gguf_path
    from engine.model.loading import resolve_model_path

    work = Path(args.work)
    (work / "gguf").mkdir(parents=True, exist_ok=True)
    if args.build_llama:
        print("building llama-cpp-python ...", flush=True)
        print(build_llama(work), flush=True)
    report: dict = {"issue": 19, "what": "our GGUF export read by transformers, llama.cpp and gguf's GGUFReader",
                    "command": "MKL_NUM_THREADS=1 OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/check_gguf.py",
                    "max_new_tokens": args.max_new, "versions": {
                        "mlx": mx.__version__, "mlx-lm": _version("mlx-lm"), "gguf (ours)": gguf.__version__
                        if hasattr(gguf, "__version__") else _version("gguf"), "python": sys.version.split()[0]}}
    t_all = time.perf_counter()

    # 1. the adapter
    print("training the adapter (lora-tui train) ...", flush=True)
    report["training"] = train = train_adapter(work, args.retrain)
    adapter = Path(train["run"]) / "adapter"
    emb = _cfg("embedded")
    emb_src = resolve_model_path(emb.model)
    emb_config = json.loads((emb_src / "config.json").read_text())

    # 2. our side
    prompts = chat_prompts()
    print("our greedy replies and logits (MLX, float32) ...", flush=True)
    ours = our_chat_side(emb, adapter, prompts, args.max_new, work, "smollm2_trained")
    base = our_chat_side(emb, None, prompts, args.max_new, work, "smollm2_base")
    report["our_side"] = {
        "dtype": ours["dtype"], "stop_ids": ours["stop"],
        "our_loop_equals_app_reply": all(c["equals_app_reply"] for c in ours["cases"] + base["cases"]),
        "adapter_changes_greedy_reply": sum(a["our_tokens"] != b["our_tokens"]
                                            for a, b in zip(ours["cases"], base["cases"])),
        "replies": {c["name"]: {"trained": c["our_text"], "base": b["our_text"], "prompt_tokens": len(c["ids"])}
                    for c, b in zip(ours["cases"], base["cases"])}}

    tiny_dir = work / "tiny_mistral"
    if not (tiny_dir / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_mistral import make_tiny_mistral
        make_tiny_mistral(tiny_dir)
    tiny = _cfg(str(tiny_dir))
    tiny_config = json.loads((tiny_dir / "config.json").read_text())
    tiny_adapter = work / "tiny_qk_adapter"
    if not (tiny_adapter / "adapters.safetensors").is_file():
        random_adapter(tiny, tiny_adapter, ["q_proj", "k_proj"])
    tiny_base = our_tiny_side(tiny, None, args.max_new, work, "tiny_base")
    tiny_ad = our_tiny_side(tiny, tiny_adapter, args.max_new, work, "tiny_qk")
    # An HF-layout llama with attention biases (attention_bias: true): llama.cpp's converter permutes q_proj.bias
    # and k_proj.bias like the weights (convert_hf_to_gguf.py, LlamaModel.modify_tensors). Read by llama.cpp only:
    # a GGUF file has no key that tells transformers' loader the model has biases.
    bias_dir = work / "tiny_llama_bias"
    if not (bias_dir / "config.json").is_file():
        make_tiny_llama_bias(bias_dir)
    bias_cfg = _cfg(str(bias_dir))
    bias_config = json.loads((bias_dir / "config.json").read_text())
    tiny_bias = our_tiny_side(bias_cfg, None, args.max_new, work, "tiny_bias")

    # 3. exports
    print("exporting ...", flush=True)
    g = work / "gguf"
    files = {}  # label -> (path, quant, model tag, our-side cases, config, weights key, hf layout)
    exports = {}
    for quant in args.types:
        p = g / f"smollm2-trained-{quant}.gguf"
        exports[f"smollm2+trained/{quant}"] = export(emb, adapter, p, quant)
        files[f"smollm2+trained/{quant}"] = (p, quant, "smollm2_trained")
    for label, (cfg_, ad, no_perm) in {"tiny-mistral/f32": (tiny, None, False),
                                       "tiny-mistral+qk/f32": (tiny, tiny_adapter, False),
                                       "tiny-mistral+qk/f32 UNPERMUTED (control)": (tiny, tiny_adapter, True)}.items():
        p = g / (label.split()[0].replace("/", "-").replace("+", "-") + ("-unpermuted" if no_perm else "") + ".gguf")
        exports[label] = export(cfg_, ad, p, "f32", no_permute=no_perm)
        files[label] = (p, "f32", "tiny_qk" if ad else "tiny_base")
    p = g / "tiny-llama-attn-bias-f32.gguf"
    exports["tiny-llama+attn-bias/f32"] = export(bias_cfg, None, p, "f32")
    files["tiny-llama+attn-bias/f32"] = (p, "f32", "tiny_bias")
    fixed = "tiny-llama+attn-bias/f32, q/k biases permuted by hand (not our file)"
    files[fixed] = (p, "f32", "tiny_bias")
    llama_only, not_ours = {"tiny-llama+attn-bias/f32", fixed}, {fixed}
    timing, base_rb = {}, {}
    for quant in args.timing_types:  # the issue's figures: the embedded base model alone
        p = g / f"smollm2-base-{quant}.gguf"
        r = export(emb, None, p, quant)
        timing[quant] = {"seconds": r["seconds"], "bytes": r["bytes"], "MiB": round(r["bytes"] / 2**20, 1),
                         "tensors": r["tensors"]}
        base_rb[quant] = read_back(p, emb_config, quant, None, False, gguf_path())
        if not args.keep_files:
            p.unlink()
    report["export_timing_embedded_base"] = timing
    report["embedded_source_gguf"] = {"file": gguf_path().name, "bytes": gguf_path().stat().st_size}
    report["exports"] = {k: {kk: v[kk] for kk in ("bytes", "seconds", "permuted_qk", "tensors")}
                         for k, v in exports.items()}

    # 4. GGUFReader
    print("reading back with GGUFReader ...", flush=True)
    w_trained = our_weights(emb, adapter)
    w_tiny = our_weights(tiny, None)
    w_tiny_qk = our_weights(tiny, tiny_adapter)
    w_bias = our_weights(bias_cfg, None)
    tiny_merges = json.loads((tiny_dir / "tokenizer.json").read_text())["model"].get("merges")
    readback = {}
    for label, (p, quant, tag) in files.items():
        if label in not_ours:
            continue
        control = "control" in label
        config = emb_config if tag.startswith("smollm2") else bias_config if tag == "tiny_bias" else tiny_config
        weights = {"smollm2_trained": w_trained, "tiny_base": w_tiny, "tiny_qk": w_tiny_qk, "tiny_bias": w_bias}[tag]
        rb = read_back(p, config, quant, weights, hf_layout=not tag.startswith("smollm2") and not control,
                       source_gguf=gguf_path() if tag.startswith("smollm2") else None,
                       need_merges=tag.startswith("smollm2") or bool(tiny_merges))
        readback[label] = rb
    del w_trained, w_tiny, w_tiny_qk, w_bias

    # 5. the third-party readers
    sides = {"smollm2_trained": ours, "tiny_base": tiny_base, "tiny_qk": tiny_ad, "tiny_bias": tiny_bias}
    llama_copies = {}
    for label, (p, quant, tag) in files.items():
        if label in not_ours:
            llama_copies[label] = with_one_merge(p, p.with_name(p.stem + "-bias-permuted.gguf"),
                                                 (bias_config["num_attention_heads"], bias_config["num_key_value_heads"]))
        elif tag.startswith("tiny") and not tiny_merges:
            llama_copies[label] = with_one_merge(p, p.with_name(p.stem + "-llama-merge.gguf"))
    report["llama_cpp_tiny_copies"] = llama_copies
    job = {"max_new": args.max_new, "stop": {k: v["stop"] for k, v in sides.items()},
           "tasks": [{"label": label, "gguf": str(p), "model": tag, "cases": sides[tag]["cases"],
                      "gguf_llama": llama_copies.get(label, {}).get("copy")}
                     for label, (p, quant, tag) in files.items()]}
    print("transformers ...", flush=True)
    hf_job = job | {"tasks": [t for t in job["tasks"] if t["label"] not in llama_only]}
    hf = run_side(TRL_PY, "transformers", hf_job, work) if TRL_PY.exists() else {"error": f"{TRL_PY} missing"}
    report["llama_cpp_build"] = lstat = llama_status(work)
    if lstat.get("installed") and not args.skip_llama:
        print("llama.cpp ...", flush=True)
        ll = run_side(LLAMA_PY, "llama", job, work)
    else:
        ll = {"error": "llama-cpp-python not available: " + str(lstat.get("why") or lstat.get("last_lines"))}
    report["versions"].update(hf.get("versions", {}))
    report["versions"].update(ll.get("versions", {}))

    # 6. verdicts
    verdicts, table = [], []

    def verdict(name, ok, detail):
        verdicts.append({"check": name, "pass": bool(ok), "detail": detail})

    for reader, res in (("transformers", hf), ("llama.cpp", ll)):
        if "error" in res:
            verdict(f"{reader}: runs", False, res["error"][-2000:])
            continue
        variants = [("", False)] if reader == "transformers" else [(" [kv f32]", False), (" [kv default (f16)]", True)]
        for (label0, (p, quant0, tag)), (suffix, kv16) in ((f, v) for f in files.items() for v in variants):
            if reader == "transformers" and label0 in llama_only:
                continue
            label = label0 + suffix
            quant = "f16 kv" if kv16 and quant0 == "f32" else quant0
            r = res["files"].get(label, {})
            if "error" in r:
                verdict(f"{reader} loads {label}", False, r["error"][:500])
                continue
            cs = r["cases"]
            exact = sum(c["exact"] for c in cs)
            pmax = max(c["max_abs_logit_diff_prompt"] for c in cs)
            rmax = max((c["max_abs_logit_diff_reply"] or 0.0) for c in cs)
            firsts = [c["first_diff"] for c in cs if c["first_diff"] is not None]
            near = all(c.get("near_tie", False) for c in cs if c["first_diff"] is not None)
            row = {"reader": reader, "file": label, "bytes": p.stat().st_size, "exact": f"{exact}/{len(cs)}",
                   "first_diff_positions": firsts, "max_abs_logit_diff_prompt": pmax,
                   "max_abs_logit_diff_reply": rmax, "divergences_near_ties": near}
            for key in ("hf_tokenizer_prompt_equal", "llama_tokenizer_prompt_equal"):
                vals = [c[key] for c in cs if key in c]
                if vals:
                    row[key] = f"{sum(vals)}/{len(vals)}"
            if "tokenizer_error" in r and tag.startswith("smollm2"):
                row["tokenizer_error"] = r["tokenizer_error"]
            table.append(row)
            if "control" in label:
                verdict(f"{reader}: {label} is caught (logits differ)", pmax > 100 * F32_LOGIT_TOL,
                        f"max |dlogit| {pmax:.3g} on the sequence; exact greedy {exact}/{len(cs)}")
            elif quant == "f32":
                verdict(f"{reader}: {label} same greedy ids and logits", exact == len(cs) and pmax < F32_LOGIT_TOL,
                        f"exact {exact}/{len(cs)}, max |dlogit| prompt {pmax:.3g}, reply {rmax:.3g}")
            else:
                verdict(f"{reader}: {label} greedy ids equal or diverge only at near-ties", exact == len(cs) or near,
                        f"exact {exact}/{len(cs)}, first diffs {firsts}, max |dlogit| prompt {pmax:.3g}")
            if r.get("file_read") and r["file_read"] != str(p):
                row["read_copy"] = Path(r["file_read"]).name
            if tag.startswith("smollm2") and not kv16:
                key = "hf_tokenizer_prompt_equal" if reader == "transformers" else "llama_tokenizer_prompt_equal"
                vals = [c.get(key) for c in cs]
                verdict(f"{reader}: its tokenizer from {label} gives our prompt ids", all(vals), f"{vals}")
    for label, r in ll.get("as_exported", {}).items():
        if "control" not in label and label not in not_ours:
            verdict(f"llama.cpp: loads {label} as exported (no tokenizer merges: the tiny tokenizer has none)",
                    r["loads"], "; ".join(r["errors"]) + " -> compared on a copy with one merge added")
    for label, rb in readback.items():
        if "control" in label:
            continue
        errs = rb["max_abs_err_vs_our_weights"]
        exact_ok = label.endswith("f32") and all(v["abs"] == 0.0 for v in errs.values())
        verdict(f"GGUFReader: {label} tensors + metadata", rb["ok"] and (exact_ok or not label.endswith("f32")),
                f"{rb['n_tensors']}/{rb['n_expected']} tensors, problems {rb['problems']}, max err vs our weights "
                f"{ {k: round(v['abs'], 6) for k, v in errs.items()} }")
    for q_, rb in base_rb.items():
        verdict(f"GGUFReader: smollm2 base/{q_} tensors + metadata", rb["ok"], f"problems {rb['problems']}")
    verdict("our greedy loop gives the app's reply() text", report["our_side"]["our_loop_equals_app_reply"], "")
    verdict("the trained adapter changes the greedy replies", report["our_side"]["adapter_changes_greedy_reply"] >= 3,
            f"{report['our_side']['adapter_changes_greedy_reply']}/5 replies differ from the base's")

    report["table"] = table
    report["verdicts"] = verdicts
    report["transformers"] = {k: v for k, v in hf.items() if k != "versions"}
    report["llama_cpp"] = {k: v for k, v in ll.items() if k != "versions"}
    report["readback"] = {k: {kk: vv for kk, vv in v.items() if kk != "tensors"} | {"tensors_first": v["tensors"][:12]}
                          for k, v in readback.items()}
    report["readback_tensor_table_smollm2_q8_0"] = readback.get("smollm2+trained/q8_0", {}).get("tensors")
    report["our_side"]["cases"] = {c["name"]: {"ids_len": len(c["ids"]), "our_tokens": c["our_tokens"]}
                                   for c in ours["cases"]}
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    _write_json(Path(args.out), report)

    # 7. print
    print()
    print(f"{'reader':<13}{'file':<60}{'MiB':>7}{'exact':>7}  {'max|dlogit| prompt':>19}{'reply':>10}  first diffs")
    for r in table:
        print(f"{r['reader']:<13}{r['file']:<60}{r['bytes'] / 2**20:>7.1f}{r['exact']:>7}  "
              f"{r['max_abs_logit_diff_prompt']:>19.3g}{r['max_abs_logit_diff_reply']:>10.3g}  "
              f"{r['first_diff_positions']}{'' if not r['first_diff_positions'] or 'control' in r['file'] else ' (near-ties)' if r['divergences_near_ties'] else ' (NOT near-ties)'}")
    print("\nexport of the embedded base model:")
    for q_, t in timing.items():
        print(f"  {q_:<5} {t['seconds']:>6.2f} s  {t['MiB']:>7.1f} MiB")
    if not lstat.get("installed"):
        print(f"\nllama.cpp: not available: {lstat}")
    print()
    for v in verdicts:
        print(f"{'PASS' if v['pass'] else 'FAIL'}  {v['check']}  {v['detail']}")
    print(f"\nwritten {args.out} ({report['total_seconds']} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/lora-tui-gguf-check")
    ap.add_argument("--out", default=str(OUT_JSON))
    ap.add_argument("--max-new", type=int, default=40)
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    ap.add_argument("--timing-types", nargs="+", default=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
    ap.add_argument("--retrain", action="store_true", help="train again even if the work folder has the adapter")
    ap.add_argument("--build-llama", action="store_true", help="create bench/.venv-llama and build llama-cpp-python")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--side", choices=["transformers", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        job = json.loads(Path(args.job).read_text())
        res = side_transformers(job) if args.side == "transformers" else side_llama(job)
        _write_json(Path(args.result), res)
        return
    sys.path.insert(0, str(ROOT))
    main_ours(args)


if __name__ == "__main__":
    main()
