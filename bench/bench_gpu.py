#!/usr/bin/env python3
"""Our engine's LoRA training step on a Mistral-7B-shaped model against PyTorch + PEFT, same GPU, same call.

On the lent GPU, after the two set-up calls of ../shared/gpu/README.md (stage1, then stage2 which installs
MLX CUDA and mlx-lm into /tmp/site):

    source .g2/stage2.sh && python3 bench/bench_gpu.py --out $OUT

Every variant runs in its own process (clean peak memory), one after another:
  matmul peak   bf16 8192^3 through MLX and through PyTorch (the MFU denominator: measured, not a datasheet)
  mlx           the engine's step: build_micro_step (compiled value_and_grad of the masked loss over trained
                positions), accumulate_gradients, clip_gradients, build_update: the functions TrainingRun uses
  mlx-nolimit   the same without the GPU memory limit TrainingRun sets (engine/model/memory.py limit_gpu_queue;
                BENCH_MEMORY_LIMIT_GB sets it as training.memory_limit_gb would)
  mlx-eager     the engine's step with gradient clipping and the optimizer update run op by op (not compiled)
  mlx-stock     neither limit nor engine/model/lean.py (plain autograd, no fused gate/up, float32 LoRA products)
  mlx+ckpt      the engine's step with gradient checkpointing (training.grad_checkpoint)
  mlx-4bit      QLoRA: the base quantized to 4 bits (group 64), adapters in float32; engine/model/qlora.py's
                layers dequantize each weight just before its bf16 matmul, forward and backward
  mlx-4bit-qfwd the same with MLX's quantized_matmul in the forward pass
  mlx-4bit+ckpt the same with gradient checkpointing
  mlx-kto, mlx-dpo, mlx-orpo, mlx-4bit-kto, mlx-4bit-dpo
                the preference steps (engine/train/objective.py) on the same sequences, against mlx / mlx-4bit
  torch         transformers MistralForCausalLM (sdpa attention) + PEFT, eager, AdamW
  torch+ckpt    the same with gradient checkpointing (non-reentrant)
Model: Mistral-7B-v0.3 shapes (32 layers, d 4096, MLP 14336, 32 heads / 8 KV heads, vocab 32768), random
bf16 weights; the seed's LoRA (rank 16, alpha 32, dropout 0.05 on q_proj and v_proj); batch 2 x 2048 random
tokens, loss on every position; AdamW lr 1e-4, grad clip 1.0. 3 warm-up steps, then 10 timed steps.

FLOPs per token (for MFU): 4 x N (forward 2N, backward to the inputs 2N; the frozen base gets no weight
gradients) + attention 12 x layers x seq x d (QK^T and AV, forward 4·L·S·d, backward twice that; PaLM's
convention, no causal discount), N = all parameters except the input embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden=4096, layers=32, mlp=14336, heads=32, kv_heads=8, vocab=32768, head_dim=128)
BATCH, SEQ, WARMUP, TIMED = 2, 2048, 3, 10
if os.environ.get("BENCH_GPU_SMOKE"):  # a tiny shape, to check the script on a CPU before spending GPU time
    SHAPE = dict(hidden=256, layers=2, mlp=512, heads=4, kv_heads=2, vocab=1024, head_dim=64)
    BATCH, SEQ, WARMUP, TIMED = 2, 64, 1, 2


def flops_per_token() -> float:
    d, L, m, v = SHAPE["hidden"], SHAPE["layers"], SHAPE["mlp"], SHAPE["vocab"]
    kv = SHAPE["kv_heads"] * SHAPE["head_dim"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * m  # q, o; k, v; gate, up, down
    n = L * per_layer + d * v  # + lm_head (the input embedding is a lookup)
    return 4 * n + 12 * L * SEQ * d


# ------------------------------------------------------------------ variants (each in its own process)

def matmul_peak() -> dict:
    import mlx.core as mx
    import torch
    n = 8192
    out = {}
    a, b = mx.random.normal((n, n)).astype(mx.bfloat16), mx.random.normal((n, n)).astype(mx.bfloat16)
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    t0 = time.perf_counter()
    for _ in range(20):
        c = a @ b
        mx.eval(c)
    out["mlx_tflops"] = 2 * n ** 3 * 20 / (time.perf_counter() - t0) / 1e12
    ta = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    tb = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        ta @ tb
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        ta @ tb
    torch.cuda.synchronize()
    out["torch_tflops"] = 2 * n ** 3 * 20 / (time.perf_counter() - t0) / 1e12
    return out


def build_model(layers: int, bits: int | None, dropout: float = 0.05, dense_forward: bool = True, lean: bool = True):
    """The bench model with the seed's LoRA, ready to train as TrainingRun would (also used by probe_gpu.py)."""
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    from engine.model.adapters import apply_lora
    from engine.config.schema import LoRAConfig

    args = llama.ModelArgs(model_type="mistral", hidden_size=SHAPE["hidden"], num_hidden_layers=layers,
                           intermediate_size=SHAPE["mlp"], num_attention_heads=SHAPE["heads"],
                           num_key_value_heads=SHAPE["kv_heads"], rms_norm_eps=1e-5, vocab_size=SHAPE["vocab"],
                           rope_theta=1e6, head_dim=SHAPE["head_dim"], tie_word_embeddings=False)
    mx.random.seed(0)
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
        mx.eval(model.parameters())
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0, dropout=dropout, target_modules=["q_proj", "v_proj"]), lean=lean)
    if bits:  # what TrainingRun does with a quantized base on a GPU
        from engine.model.qlora import dequantize_just_in_time
        dequantize_just_in_time(model, dense_forward=dense_forward)
    model.train()
    return model


def random_batch():
    """BATCH x SEQ random tokens, loss on every position, as engine.train.losses.masked_loss takes them."""
    import numpy as np

    from engine.train.losses import loss_inputs
    tokens = np.random.default_rng(0).integers(0, SHAPE["vocab"], (BATCH, SEQ + 1)).astype(np.int32)
    return loss_inputs(tokens[:, :-1], tokens[:, 1:], np.ones((BATCH, SEQ), dtype=bool))


def mlx_step(ckpt: bool, bits: int | None, dense_forward: bool = True, lean: bool = True,
             queue_limit: bool = True, compiled_update: bool = True) -> dict:
    model = build_model(SHAPE["layers"], bits, dense_forward=dense_forward, lean=lean)
    import mlx.core as mx
    import mlx.optimizers as optim

    from engine.model.adapters import trainable_count
    from engine.model.memory import ModelShape, estimate_step_memory, fused_attention, limit_gpu_queue
    from engine.train.step import accumulate_gradients, apply_update, build_micro_step, build_update, \
        checkpointed_layers, clip_gradients

    # What TrainingRun does: estimate the step, then cap MLX's queue near it (training.memory_limit_gb, 0 = auto).
    estimate = estimate_step_memory(ModelShape.of(model), mx.get_active_memory(), trainable_count(model), BATCH,
                                    SEQ, 1.0, ckpt, 2, fused_attention())
    if queue_limit:
        limit_gpu_queue(estimate, float(os.environ.get("BENCH_MEMORY_LIMIT_GB", "0")))
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(model.trainable_parameters())
    weights_bytes = mx.get_active_memory()
    batch = random_batch()

    with checkpointed_layers(model, ckpt):
        micro_step = build_micro_step(model, optimizer)
        update = build_update(model, optimizer)

        def step():
            grads, loss = accumulate_gradients(micro_step, [batch])
            if compiled_update:
                grads, norm = clip_gradients(grads, 1.0)
                update(grads)
            else:  # what the engine did before: clipping and the optimizer op by op
                grads, norm = optim.clip_grad_norm(grads, 1.0)
                apply_update(model, optimizer, grads)
            return loss.item()

        loss, dt = timed_steps(step)
    return dict(tokens_per_s=BATCH * SEQ * TIMED / dt, step_s=dt / TIMED, peak_gb=mx.get_peak_memory() / 1e9,
                weights_gb=weights_bytes / 1e9, loss=loss, estimate_gb=estimate.total / 1e9,
                memory_limit_gb=mx.get_memory_limit() / 1e9)


def timed_steps(step) -> tuple[float, float]:
    """(last loss, seconds) of TIMED steps after WARMUP, with MLX's peak memory reset between."""
    import mlx.core as mx
    for _ in range(WARMUP):
        step()
    mx.reset_peak_memory()
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        loss = step()
    mx.synchronize()
    return loss, time.perf_counter() - t0


def mlx_preference_step(method: str, bits: int | None = None) -> dict:
    """A KTO / DPO / ORPO optimizer step through engine/train/objective.py (the step TrainingRun takes), on
    BATCH sequences of SEQ random tokens, each a 64-token prompt and its answer: KTO scores BATCH rows and runs
    its z0 forward over BATCH mismatched pairs; DPO/ORPO take BATCH // 2 pairs, so every variant puts BATCH
    sequences through the gradient pass, as `mlx` does. Reference log-probs are given (scored before step 1)."""
    model = build_model(SHAPE["layers"], bits, dropout=0.0)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from engine.config.schema import Config
    from engine.data import Encoded, Example
    from engine.model.adapters import trainable_count
    from engine.model.memory import ModelShape, estimate_step_memory, fused_attention, limit_gpu_queue
    from engine.train.objective import PreferenceObjective
    from engine.train.preference_batches import PreferenceRows
    from engine.train.step import build_update, clip_gradients

    rows = BATCH if method == "kto" else BATCH // 2
    estimate = estimate_step_memory(ModelShape.of(model), mx.get_active_memory(), trainable_count(model), BATCH,
                                    SEQ, 1.0, False, 2, fused_attention())
    limit_gpu_queue(estimate, 0.0)
    rng = np.random.default_rng(0)
    trained = np.arange(SEQ + 1) >= 64

    def seq():
        return Encoded(rng.integers(0, SHAPE["vocab"], SEQ + 1).astype(np.int32), trained.copy())
    examples = [Example(i, "desirable" if i % 2 == 0 else "undesirable", seq(),
                        None if method == "kto" else seq()) for i in range(rows)]
    cfg = Config()
    cfg.training.method, cfg.model.max_seq_length = method, SEQ + 1
    objective = PreferenceObjective(cfg, model, 0, PreferenceRows(method, examples, SEQ + 1, 0),
                                    PreferenceRows(method, [], SEQ + 1, 0))
    objective.reference["train"][:] = -5.0 * SEQ  # given, as if scored before step 1
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(model.trainable_parameters())
    weights_bytes = mx.get_active_memory()
    objective.build(optimizer)
    update = build_update(model, optimizer)

    def step():
        grads, loss, _, _ = objective.step([list(range(rows))])
        grads, _ = clip_gradients(grads, 1.0)
        update(grads)
        return loss.item()

    loss, dt = timed_steps(step)
    return dict(tokens_per_s=BATCH * SEQ * TIMED / dt, step_s=dt / TIMED, peak_gb=mx.get_peak_memory() / 1e9,
                weights_gb=weights_bytes / 1e9, loss=loss, estimate_gb=estimate.total / 1e9)


def torch_step(ckpt: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=SHAPE["hidden"], num_hidden_layers=SHAPE["layers"],
                        intermediate_size=SHAPE["mlp"], num_attention_heads=SHAPE["heads"],
                        num_key_value_heads=SHAPE["kv_heads"], vocab_size=SHAPE["vocab"], rope_theta=1e6,
                        head_dim=SHAPE["head_dim"], max_position_embeddings=32768, sliding_window=None,
                        attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    weights = torch.cuda.memory_allocated()
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab"], (BATCH, SEQ), device="cuda", generator=g)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(WARMUP):
        step()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dict(tokens_per_s=BATCH * SEQ * TIMED / dt, step_s=dt / TIMED,
                peak_gb=torch.cuda.max_memory_allocated() / 1e9, reserved_gb=torch.cuda.max_memory_reserved() / 1e9,
                weights_gb=weights / 1e9, loss=loss)


VARIANTS = {
    "peak": matmul_peak,
    "mlx": lambda: mlx_step(False, None),
    "mlx-nolimit": lambda: mlx_step(False, None, queue_limit=False),
    "mlx-eager": lambda: mlx_step(False, None, compiled_update=False),
    "mlx-stock": lambda: mlx_step(False, None, lean=False, queue_limit=False),
    "mlx+ckpt": lambda: mlx_step(True, None),
    "mlx-4bit": lambda: mlx_step(False, 4),
    "mlx-4bit-qfwd": lambda: mlx_step(False, 4, dense_forward=False),
    "mlx-4bit+ckpt": lambda: mlx_step(True, 4),
    "mlx-kto": lambda: mlx_preference_step("kto"),
    "mlx-dpo": lambda: mlx_preference_step("dpo"),
    "mlx-orpo": lambda: mlx_preference_step("orpo"),
    "mlx-4bit-kto": lambda: mlx_preference_step("kto", 4),
    "mlx-4bit-dpo": lambda: mlx_preference_step("dpo", 4),
    "torch": lambda: torch_step(False),
    "torch+ckpt": lambda: torch_step(True),
}


def versions() -> dict:
    out = {}
    for name in ("mlx", "mlx_lm", "torch", "transformers", "peft"):
        try:
            from importlib.metadata import version
            out[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            out[name] = "?"
    return out


def median_run(runs: list[dict], key: str, runs_key: str) -> dict:
    """The run with the median `key` stands for its variant, with every run's `key` kept as `runs_key`
    (a variant that failed every time: its last error)."""
    ok = sorted((r for r in runs if key in r), key=lambda r: r[key])
    return dict(ok[len(ok) // 2], **{runs_key: [r[key] for r in ok]}) if ok else runs[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", help="run one variant in this process and print its JSON")
    ap.add_argument("--only", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="run the list this many times, interleaved; report medians")
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(VARIANTS[args.variant]()), flush=True)
        return

    results, runs = {}, {}
    for name in [n for i in range(args.repeat) for n in args.only if i == 0 or n != "peak"]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--variant", name], capture_output=True, text=True,
                              timeout=240)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-600:]}
        print(f"{name}: {r}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        runs.setdefault(name, []).append(r)
    for name, rs in runs.items():
        results[name] = median_run(rs, "tokens_per_s", "runs_tokens_per_s")

    peak = results.get("peak", {}).get("mlx_tflops")
    fpt = flops_per_token()
    torch_base = results.get("torch", {})
    print(f"\nversions: {versions()}; flops/token {fpt / 1e9:.1f} GFLOP; matmul peak (bf16 8192^3): "
          f"MLX {peak or 0:.0f}, PyTorch {results.get('peak', {}).get('torch_tflops', 0):.0f} TFLOP/s")
    print(f"{'variant':<15}{'tokens/s':>10}{'step s':>8}{'peak GB':>9}{'vs torch tok/s':>16}{'vs torch mem':>14}"
          f"{'MFU':>7}")
    for name, r in results.items():
        if name == "peak" or "tokens_per_s" not in r:
            continue
        speed = r["tokens_per_s"] / torch_base["tokens_per_s"] if "tokens_per_s" in torch_base else float("nan")
        mem = r["peak_gb"] / torch_base["peak_gb"] if "peak_gb" in torch_base else float("nan")
        mfu = r["tokens_per_s"] * fpt / (peak * 1e12) if peak else float("nan")
        print(f"{name:<15}{r['tokens_per_s']:>10.0f}{r['step_s']:>8.3f}{r['peak_gb']:>9.1f}{speed:>15.2f}x"
              f"{mem:>13.2f}x{mfu:>7.0%}")
    for name, r in results.items():  # the preference steps against the SFT step on the same base, same call
        sft = results.get("mlx-4bit" if "4bit" in name else "mlx", {})
        if any(m in name for m in ("kto", "dpo", "orpo")) and "step_s" in r and "step_s" in sft:
            print(f"{name:<15} step {r['step_s'] / sft['step_s']:.2f}x, peak {r['peak_gb'] / sft['peak_gb']:.2f}x "
                  "the SFT step's")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_gpu.json").write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "flops_per_token": fpt,
             "results": results}, indent=1))


if __name__ == "__main__":
    main()
