"""The PyTorch-side variants of bench_gpu.py (issue 22): PEFT eager, PEFT + regional torch.compile, PEFT + Liger
kernels, PEFT + bitsandbytes NF4, Unsloth (bf16 and 4-bit), each with or without gradient checkpointing, with LoRA
on q/v or on all seven linear layers. Same shape, batch, optimizer and timing as the MLX variants; every variant
runs in its own process (bench_gpu.py starts it). What each variant does:

  torch              transformers MistralForCausalLM (sdpa) + PEFT LoRA, eager
  torch-compile      the same, each decoder layer compiled on its own (regional compilation: `layer.compile()`
                     on the 32 PEFT-wrapped MistralDecoderLayers). Layers 1-31 share one compiled graph, layer 0
                     (whose input needs no gradient) gets a second: "compiled_graphs" in the row says 2, not 32
  torch-liger        PEFT + Liger kernels (apply_liger_kernel_to_mistral before the model is built: RoPE,
                     RMSNorm, SwiGLU, fused linear cross-entropy; labels go to forward so the loss and its
                     gradient are computed chunk by chunk without the 4096 x 32768 logits)
  torch-4bit         PEFT on a bitsandbytes NF4 base (transformers' BitsAndBytesConfig, bf16 compute), the
                     QLoRA recipe without prepare_model_for_kbit_training (it would turn checkpointing on)
  unsloth            Unsloth's FastLanguageModel on a bf16 checkpoint of the same random model (saved once under
                     $BENCH_MODEL_DIR), get_peft_model. Its fused LoRA kernels need q, k and v all adapted (and
                     o; and gate, up and down): with q/v alone it runs PEFT's LoRA layers with its own RoPE, RMSNorm,
                     SwiGLU and cross-entropy kernels. Dropout runs inside its fused kernels (since 2026, unless
                     UNSLOTH_FUSED_LORA_DROPOUT=0). The row's "log" keeps what it said it patched
  unsloth-4bit       the same loaded with load_in_4bit=True (bitsandbytes NF4): Unsloth's QLoRA
  +ckpt              gradient checkpointing: HF's non-reentrant checkpointing for torch*, Unsloth's own
                     ("unsloth": activations offloaded to CPU memory) for unsloth*
Memory: torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps (peak_gb / reserved_gb).

On a CPU (BENCH_GPU_SMOKE=1 only) the variants run on the CPU at the tiny shape to check the plumbing; Liger and
bitsandbytes need a GPU (Triton, CUDA kernels), Unsloth imports on a CPU-only host only with UNSLOTH_ALLOW_CPU=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench_gpu import BATCH, SEQ, SHAPE, TARGETS, TIMED, WARMUP

RANK, ALPHA = 16, 32
# The peers' processes: no network there (no hub look-ups, no Unsloth statistics), Unsloth's generated code outside
# the work tree (it writes ./unsloth_compiled_cache otherwise).
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "UNSLOTH_DISABLE_STATISTICS": "1", "TOKENIZERS_PARALLELISM": "false",
           "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache"}


def device() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("BENCH_GPU_SMOKE"):
        return "cpu"
    raise RuntimeError("no CUDA device (BENCH_GPU_SMOKE=1 runs the tiny shape on the CPU)")


def mistral_config():
    import torch
    from transformers import MistralConfig
    return MistralConfig(hidden_size=SHAPE["hidden"], num_hidden_layers=SHAPE["layers"],
                         intermediate_size=SHAPE["mlp"], num_attention_heads=SHAPE["heads"],
                         num_key_value_heads=SHAPE["kv_heads"], vocab_size=SHAPE["vocab"], rope_theta=1e6,
                         head_dim=SHAPE["head_dim"], max_position_embeddings=32768, sliding_window=None,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, attn_implementation="sdpa", torch_dtype=torch.bfloat16)


def random_model(dev: str):
    """MistralForCausalLM at SHAPE with random bf16 weights, built on `dev` (seed 0)."""
    import torch
    from transformers import MistralForCausalLM
    torch.manual_seed(0)
    with torch.device(dev):
        return MistralForCausalLM(mistral_config()).to(torch.bfloat16)


def lora_config(targets: str, dropout: float):
    from peft import LoraConfig
    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS[targets],
                      task_type="CAUSAL_LM")


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def train_loop(model, dev: str, setup_s: float, extra: dict | None = None) -> dict:
    """WARMUP + TIMED steps of loss = model(input_ids, labels).loss, backward, clip 1.0, AdamW 1e-4 (PyTorch's
    default implementation, as the `torch` row always had); peak memory over the timed steps."""
    import torch
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = dev == "cuda"
    weights = torch.cuda.memory_allocated() if cuda else 0
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab"], (BATCH, SEQ), device=dev, generator=g)

    def step():  # use_cache=False: no KV cache while training (with it, each compiled layer recompiles)
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(WARMUP):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    return dict(tokens_per_s=BATCH * SEQ * TIMED / dt, step_s=dt / TIMED,
                peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
                reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if cuda else 0.0,
                weights_gb=weights / 1e9, loss=loss, trainable=sum(p.numel() for p in params),
                # modules with checkpointing on (HF's flag, which Unsloth sets too): 0 in the rows without +ckpt
                ckpt_modules=sum(getattr(m, "gradient_checkpointing", False) is not False for m in model.modules()),
                setup_s=setup_s, warmup_s=warmup_s, **(extra or {}))


def checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def torch_step(ckpt: bool, targets: str = "qv", dropout: float = 0.05, compile_layers: bool = False,
               liger: bool = False) -> dict:
    """PEFT on transformers' MistralForCausalLM: eager, regionally compiled, or with Liger's kernels."""
    t0 = time.perf_counter()
    import torch
    from peft import get_peft_model
    dev = device()
    extra = {}
    if liger:  # patches modeling_mistral's classes and forward: must come before the model is built
        from liger_kernel.transformers import apply_liger_kernel_to_mistral
        apply_liger_kernel_to_mistral(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                      fused_linear_cross_entropy=True)
    model = random_model(dev)
    if liger:
        extra["liger_modules"] = sorted({type(m).__name__ for m in model.modules() if "Liger" in type(m).__name__})
    if ckpt:
        checkpointing(model)
    model = get_peft_model(model, lora_config(targets, dropout))
    model.train()
    if compile_layers:
        import torch._dynamo
        # Identical layers should share one graph (parameters are graph inputs since torch 2.5); a higher
        # cache limit keeps a layer that does recompile from falling back to eager silently.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in model.base_model.model.model.layers:
            layer.compile()
    r = train_loop(model, dev, time.perf_counter() - t0, extra)
    if compile_layers:
        from torch._dynamo.utils import counters
        r["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        r["compile_calls"] = int(counters["stats"]["calls_captured"])
    return r


# ------------------------------------------------------------------ a saved random checkpoint (Unsloth, bnb)

def model_dir() -> Path:
    root = Path(os.environ.get("BENCH_MODEL_DIR", "/tmp/bench_gpu_models"))
    return root / f"mistral-d{SHAPE['hidden']}-l{SHAPE['layers']}-m{SHAPE['mlp']}-v{SHAPE['vocab']}"


def save_random_checkpoint(path: str) -> None:
    """Write the random model (bf16 safetensors), its config and a word-level tokenizer over the vocabulary to
    `path`, atomically (a sibling temp folder renamed at the end). Runs in its own process, before Unsloth is
    imported anywhere (Unsloth must be imported before transformers to patch it)."""
    import shutil

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    final = Path(path)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(dev)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"t{i}": i for i in range(4, SHAPE["vocab"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", model_max_length=32768).save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def ensure_checkpoint() -> tuple[Path, float]:
    """(the saved random checkpoint, seconds spent making it now: 0 when it was there)."""
    path = model_dir()
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path, 0.0
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_gpu; "  # bench_gpu first: it imports us
            "bench_gpu.peers.save_random_checkpoint(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(path)], check=True,
                   env={**os.environ, **OFFLINE})
    return path, time.perf_counter() - t0


def torch_4bit_step(ckpt: bool, targets: str = "qv", dropout: float = 0.05) -> dict:
    """PEFT on a bitsandbytes NF4 base (double quantization off, bf16 compute), loaded from the checkpoint."""
    t0 = time.perf_counter()
    path, made_s = ensure_checkpoint()
    import torch
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig, MistralForCausalLM
    dev = device()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = MistralForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                               device_map={"": 0} if dev == "cuda" else {"": "cpu"})
    if ckpt:
        checkpointing(model)
    model = get_peft_model(model, lora_config(targets, dropout))
    model.train()
    return train_loop(model, dev, time.perf_counter() - t0, {"checkpoint_made_s": made_s})


def unsloth_step(ckpt: bool, bits: int | None, targets: str = "qv", dropout: float = 0.05) -> dict:
    """Unsloth's FastLanguageModel on the saved random checkpoint, LoRA through its get_peft_model."""
    t0 = time.perf_counter()
    path, made_s = ensure_checkpoint()  # in a child process: transformers is not imported here yet
    os.environ.update(OFFLINE)
    import unsloth  # noqa: F401  (first, so that it patches transformers and peft)
    import torch
    from unsloth import FastLanguageModel
    dev = device()
    mode = "unsloth" if ckpt else False  # Unsloth's default is "unsloth" at every step: said each time
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(path), max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=bits == 4,
        use_gradient_checkpointing=mode, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS[targets], bias="none",
        use_gradient_checkpointing=mode, random_state=0, max_seq_length=SEQ)
    FastLanguageModel.for_training(model, use_gradient_checkpointing=mode)
    return train_loop(model, dev, time.perf_counter() - t0, {"checkpoint_made_s": made_s})


VARIANTS = {
    "torch": lambda t, d: torch_step(False, t, d),
    "torch+ckpt": lambda t, d: torch_step(True, t, d),
    "torch-compile": lambda t, d: torch_step(False, t, d, compile_layers=True),
    "torch-compile+ckpt": lambda t, d: torch_step(True, t, d, compile_layers=True),
    "torch-liger": lambda t, d: torch_step(False, t, d, liger=True),
    "torch-liger+ckpt": lambda t, d: torch_step(True, t, d, liger=True),
    "torch-4bit": lambda t, d: torch_4bit_step(False, t, d),
    "torch-4bit+ckpt": lambda t, d: torch_4bit_step(True, t, d),
    "unsloth": lambda t, d: unsloth_step(False, None, t, d),
    "unsloth+ckpt": lambda t, d: unsloth_step(True, None, t, d),
    "unsloth-4bit": lambda t, d: unsloth_step(False, 4, t, d),
    "unsloth-4bit+ckpt": lambda t, d: unsloth_step(True, 4, t, d),
}

# Seconds a variant is expected to take on an H100, process start to result (guesses where not yet measured:
# see bench_gpu.py's docstring); bench_gpu.py's --budget starts a variant only if this much time is left.
ESTIMATE_S = {"torch": 30, "torch+ckpt": 30, "torch-compile": 120, "torch-compile+ckpt": 130, "torch-liger": 45,
              "torch-liger+ckpt": 45, "torch-4bit": 70, "torch-4bit+ckpt": 70, "unsloth": 120,
              "unsloth+ckpt": 125, "unsloth-4bit": 140, "unsloth-4bit+ckpt": 145}
