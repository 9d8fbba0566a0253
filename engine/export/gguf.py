"""GGUF export: base + adapter fused, tensor by tensor, into one file llama.cpp, Ollama and LM Studio load,
written by llama.cpp's own `gguf` package (its writer, tensor names, quantizers and tokenizer readers).

Layout: llama.cpp's RoPE pairs neighbouring q/k rows, Hugging Face's pairs row i with i + d/2, so an HF
checkpoint's q_proj and k_proj rows are permuted on the way in (convert_hf_to_gguf's `permute`). The embedded
model was imported from a GGUF file and keeps llama.cpp's layout (`rope_traditional: true`): no permutation,
and its tokenizer metadata is copied from that file as it was.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from engine import atomic
from engine.config.schema import Config
from engine.export.errors import ExportError, ExportUsageError

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # model_type -> GGUF architecture we write
QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
Progress = Callable[[str, float], None]


def _qtypes(gguf) -> dict:
    q = gguf.GGMLQuantizationType
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q5_1": q.Q5_1, "q5_0": q.Q5_0,
            "q4_1": q.Q4_1, "q4_0": q.Q4_0}


def _file_types(gguf) -> dict:
    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0,
            "q5_1": t.MOSTLY_Q5_1, "q5_0": t.MOSTLY_Q5_0, "q4_1": t.MOSTLY_Q4_1, "q4_0": t.MOSTLY_Q4_0}


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved pairs (per head: rows i and i + d/2
    become neighbours). `n_head` is the key/value head count for k_proj."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dense_tensors(model) -> Iterator[tuple[str, Callable]]:
    """(Hugging Face name, a function giving the float32 weight) for every weight of the model: adapters fused
    into their layer, quantized layers dequantized, one tensor at a time (a 7B model is never whole in
    float32)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    def dense(m):
        if isinstance(m, (LoRALinear, DoRALinear)):
            return m.fuse(dequantize=True).weight
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits, mode=m.mode)
        return m.weight

    done: list[str] = []
    for path, m in sorted(model.named_modules(), key=lambda pm: pm[0]):
        if any(path.startswith(p + ".") for p in done) or not path:
            continue  # inside a fused adapter layer (its .linear)
        if isinstance(m, (LoRALinear, DoRALinear, nn.QuantizedLinear, nn.QuantizedEmbedding)):
            done.append(path)
            yield f"{path}.weight", lambda m=m: dense(m)
            inner = m.linear if isinstance(m, (LoRALinear, DoRALinear)) else m
            if "bias" in inner:
                yield f"{path}.bias", lambda b=inner.bias: b
            continue
        for key, value in m.items():
            if isinstance(value, mx.array) and not m.children().get(key):
                yield f"{path}.{key}", lambda v=value: v


def _numpy(array) -> np.ndarray:
    import mlx.core as mx
    return np.asarray(array.astype(mx.float32))


def export_gguf(cfg: Config, adapter: str | Path | None, out: str | Path, quant: str = "f16",
                progress: Progress | None = None) -> dict:
    """Write base (+ adapter, fused) as one GGUF file at `out`, atomically. Returns what was written."""
    import gguf

    from engine.model.adapters import load_with_adapter
    from engine.model.loading import load_model, resolve_model_path

    report = progress or (lambda what, fraction: None)
    if quant not in QUANTS:
        raise ExportUsageError(f"--quant {quant}: not a GGUF type we write; use one of {', '.join(QUANTS)}")
    out = _check_target(out)
    t0 = time.perf_counter()
    src = resolve_model_path(cfg.model)
    config = json.loads((src / "config.json").read_text())
    arch = ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:  # before loading anything: a refusal should not wait for the model
        raise ExportError(f"{cfg.model.name}: model_type {config.get('model_type')!r}: the GGUF export writes "
                          f"{', '.join(sorted(ARCHITECTURES))} models; export to mlx or peft instead")
    if config.get("rope_scaling"):
        raise ExportError(f"{cfg.model.name}: rope_scaling {config['rope_scaling']} is not written to GGUF yet; "
                          "export to mlx or peft instead")
    report("loading the model and adapter", 0.02)
    model, tokenizer, info = load_with_adapter(cfg, adapter) if adapter else load_model(cfg.model)
    tensors = list(dense_tensors(model))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    qtype = _qtypes(gguf)[quant]
    try:
        with atomic.file(out) as tmp:
            writer = gguf.GGUFWriter(str(tmp), arch)
            _write_metadata(writer, gguf, config, cfg, adapter, quant, src, tokenizer)
            plan = []
            for hf_name, get in tensors:
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ExportError(f"{hf_name}: a tensor llama.cpp's {arch} layout has no name for; export to "
                                      "mlx or peft instead")
                shape = tuple(get().shape)  # lazy: nothing is computed for a shape
                kind = _kind(gguf, shape, qtype)
                plan.append((hf_name, name, get, kind))
                writer.add_tensor_info(name, *_stored(gguf, shape, kind), raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            permute = not config.get("rope_traditional", False)
            heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads",
                                                                        config["num_attention_heads"])
            for i, (hf_name, name, get, kind) in enumerate(plan):
                data = _numpy(get())
                if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                    data = permute_for_gguf(data, heads if "q_proj" in hf_name else kv_heads)
                writer.write_tensor_data(_encode(gguf, data, kind))
                report(f"writing {name}", 0.1 + 0.88 * (i + 1) / len(plan))
            writer.close()
    except OSError as exc:
        raise ExportError(f"{out}: could not write the GGUF file ({exc.strerror or exc}); nothing was left "
                          "there") from None
    report("done", 1.0)
    return {"path": str(out), "bytes": out.stat().st_size, "files": [out.name], "format": "gguf",
            "quant": quant, "tensors": len(plan), "seconds": round(time.perf_counter() - t0, 2),
            "permuted_qk": permute}


def _kind(gguf, shape: tuple, qtype):
    """The stored type: norms and other 1-D tensors stay float32 (as llama.cpp keeps them); a matrix whose rows
    do not split into the type's blocks falls back to float16."""
    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or qtype == q.F32:
        return q.F32
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else q.F16


def _stored(gguf, shape: tuple, kind) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, bytes) as the writer's tensor table wants them: quantized data is bytes."""
    q = gguf.GGMLQuantizationType
    if kind in (q.F32, q.F16):
        dtype = np.dtype(np.float32 if kind == q.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _encode(gguf, data: np.ndarray, kind) -> np.ndarray:
    if kind == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, kind)


def _check_target(out: str | Path) -> Path:
    path = Path(out).expanduser().absolute()
    if path.exists() or path.is_symlink():
        raise ExportUsageError(f"--out {path}: exists; name a new file (nothing was changed)")
    parent = path.parent
    while not parent.exists():  # missing folders are made; a file in the way is not
        parent = parent.parent
    if not parent.is_dir():
        raise ExportUsageError(f"--out {path}: {parent} is a file, so no folder can be made inside it")
    return path


def _write_metadata(writer, gguf, config: dict, cfg: Config, adapter, quant: str, src: Path, tokenizer) -> None:
    """The llama architecture's hyperparameters and the tokenizer, as llama.cpp's converter writes them."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_type("model")
    writer.add_name(Path(cfg.model.name).name + (f" + {Path(adapter).name}" if adapter else ""))
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(_file_types(gguf)[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    from engine.model.embedded import gguf_path, is_embedded
    if is_embedded(cfg.model.name):
        _copy_tokenizer(writer, gguf, gguf.GGUFReader(str(gguf_path())))
    else:
        _hf_tokenizer(writer, gguf, src, config["vocab_size"])


def _copy_tokenizer(writer, gguf, reader) -> None:
    """The embedded model came from a GGUF file: its tokenizer metadata goes back exactly as it was."""
    f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    writer.add_tokenizer_model(f["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in f:
        writer.add_tokenizer_pre(f["tokenizer.ggml.pre"])
    writer.add_token_list(f["tokenizer.ggml.tokens"])
    writer.add_token_types(f["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in f:
        writer.add_token_merges(f["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in f:
        writer.add_token_scores(f["tokenizer.ggml.scores"])
    for kind in ("bos", "eos", "unknown", "padding"):
        if f"tokenizer.ggml.{kind}_token_id" in f:
            add = getattr(writer, f"add_{'unk' if kind == 'unknown' else 'pad' if kind == 'padding' else kind}_token_id")
            add(f[f"tokenizer.ggml.{kind}_token_id"])
    for flag in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        if f"tokenizer.ggml.{flag}" in f:
            getattr(writer, f"add_{flag}")(f[f"tokenizer.ggml.{flag}"])
    if "tokenizer.chat_template" in f:
        writer.add_chat_template(f["tokenizer.chat_template"])


def _hf_tokenizer(writer, gguf, src: Path, vocab_size: int) -> None:
    """A Hugging Face tokenizer through llama.cpp's own readers: SentencePiece-style BPE with byte fallback
    (Mistral, Llama 2) as "llama", byte-level BPE as "gpt2"; special tokens, merges and the chat template
    from SpecialVocab. Tokens the model has rows for but the tokenizer lacks are padded, as llama.cpp does."""
    try:
        vocab = gguf.vocab.LlamaHfVocab(src)
    except (FileNotFoundError, TypeError):
        try:
            vocab = gguf.vocab.BpeVocab(src)
        except (FileNotFoundError, ValueError) as exc:
            raise ExportError(f"{src}: a tokenizer llama.cpp's readers do not know ({exc}); export to mlx or "
                              "peft instead") from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    special = _special_ids(src)
    types = [gguf.TokenType.CONTROL if i in special and t == gguf.TokenType.NORMAL else t for i, t in enumerate(types)]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_token_list(tokens)
    if vocab.tokenizer_model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer,
                                                                                                        quiet=True)


def _special_ids(src: Path) -> set[int]:
    """Ids of the tokenizer's special added tokens (<s>, [INST], <|im_end|>): control tokens in GGUF, so
    llama.cpp parses them in a prompt instead of spelling them out."""
    try:
        data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
