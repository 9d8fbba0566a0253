#!/usr/bin/env python3
"""Our engine's LoRA training step on a Mistral-7B-shaped model against PyTorch + PEFT, Liger and Unsloth, same GPU.

On the lent GPU, after the set-up calls below: `python3 bench/bench_gpu.py [--group G ...] [--only NAME ...]
[--targets qv all] [--budget S] --out $OUT`. Every variant runs in its own process (clean peak memory):
  peak          bf16 8192^3 through MLX and through PyTorch (the MFU denominator: measured, not a datasheet)
  mlx           the engine's step: build_micro_step (compiled value_and_grad of the masked loss over trained
                positions), accumulate_gradients, clip_gradients, build_update: the functions TrainingRun uses
  mlx-nolimit   the same without the GPU memory limit TrainingRun sets (engine/model/memory.py limit_gpu_queue;
                BENCH_MEMORY_LIMIT_GB sets it as training.memory_limit_gb would)
                BENCH_FUSE_QKV=0/1 runs the frozen q/k/v apart / as one matmul (engine/model/lean.py FUSE_QKV, on
                CUDA by default, and FUSE_QKV_QUANTIZED for 4-bit bases, off by default); BENCH_SWIGLU_KERNEL=0/1
                the fused gate + up SwiGLU gradient by MLX ops / by engine/model/swiglu_cuda.py's kernel (CUDA);
                BENCH_LORA_KERNELS=0/1 the adapters' dropout by lean.py's ops / inside their products
                (engine/model/lora_cuda.py's kernels, CUDA);
                BENCH_CE_CHUNK_BYTES=N the head's loss and gradient in chunks of N bytes of logits
                (engine/train/losses.py; 0 = all at once, kept for the backward pass); BENCH_LOOK_AHEAD=0/1
                reads each step before building the next / queues the next first with the guarded update
                (engine/train/step_queue.py; default as TrainingRun: on CUDA with the flat update);
                BENCH_TIMES=FILE writes the host's share of each look-ahead step there; BENCH_FLAT_UPDATE=0/1
                the optimizer array by array / over one flat vector (engine/train/flat_update.py, CUDA default)
  mlx-eager     the engine's step with gradient clipping and the optimizer update run op by op (not compiled)
  mlx-stock     neither limit nor engine/model/lean.py (plain autograd, no fused gate/up, float32 LoRA products)
  mlx+ckpt      the engine's step with gradient checkpointing (training.grad_checkpoint)
  mlx-4bit      QLoRA: the base quantized to 4 bits (group 64), adapters in float32; engine/model/qlora.py's
                layers dequantize each weight just before its bf16 matmul, forward and backward
  mlx-4bit-qfwd the same with MLX's quantized_matmul in the forward pass
  mlx-4bit+ckpt the same with gradient checkpointing
  mlx-kto, mlx-dpo, mlx-orpo, mlx-4bit-kto, mlx-4bit-dpo
                the preference steps (engine/train/objective.py) on the same sequences, against mlx / mlx-4bit
  torch, torch-compile, torch-liger, torch-4bit, unsloth, unsloth-4bit (each also +ckpt)
                the peers: bench_gpu_peers.py says what each runs. Since issue 22 the PyTorch rows pass
                use_cache=False (no KV cache built while training; earlier rows built one)
NAME:all      LoRA on all seven linear layers (q, k, v, o, gate, up, down) instead of q/v; --targets qv all
              runs every --only name without a suffix both ways. Rows carry "targets" and "dropout".
Model: Mistral-7B-v0.3 shapes (32 layers, d 4096, MLP 14336, 32 heads / 8 KV heads, vocab 32768), random
bf16 weights; LoRA rank 16, alpha 32, dropout 0.05 (--dropout), on q_proj and v_proj unless :all; batch 2 x
2048 random tokens, loss on every position; AdamW lr 1e-4, grad clip 1.0. 3 warm-up steps, then 10 timed.
The second table puts each of mlx, mlx+ckpt, mlx-4bit, mlx-4bit+ckpt against the fastest peer measured at
the same targets, checkpointing and base precision (speed and peak-memory ratios). Groups measured in
separate calls: `python3 bench/bench_gpu.py --merge a.json b.json` prints the tables over their rows.

Device calls (issue 22), back to back (a machine stays warm 30 s after a call and is held 30 min at most):
  here, once: `bash ../shared/gpu/prepare.sh` (.g1/, .g2/) and `bash bench/peer_wheels.sh` (.g3/, 15 MB)
  (to run the CUDA tests there: `pip download -d .g2/extra pytest pluggy iniconfig packaging`, then after stage 3
  `python3 -m pytest -q -p no:cacheprovider tests/test_lora_cuda.py tests/test_philox.py tests/test_lean.py -k
  cuda`; a kernel source changed since its last GPU run compiles here first: bench/nvrtc_check.py)
  1. carry [".g1"]  `bash .g1/stage1.sh`                   half of the MLX CUDA wheel into /root/mlxwheel
  2. carry [".g3"]  `bash .g3/stage3.sh`                   peer wheels into /root/peer_wheels and /tmp/site;
                                                           prints torch/transformers/peft versions: check them
  3. carry [".g2"]  `set -o pipefail; source .g2/stage2.sh && bash bench/install_peers.sh && PYTHONUNBUFFERED=1
                    python3 bench/bench_gpu.py --group bf16-qv --budget 520 --out $OUT 2>&1 | tee $OUT/log`
  4+ carry []       `set -o pipefail; export PYTHONPATH=/tmp/site; PYTHONUNBUFFERED=1 python3 bench/bench_gpu.py
                    --group bf16-all --budget 560 --out $OUT 2>&1 | tee $OUT/log`, then ckpt, 4bit-qv, 4bit-all,
                    rest in that order of priority, one group a call.
The random checkpoint that Unsloth and torch-4bit load (15 GB) is written once, by the first variant that
needs it, under $BENCH_MODEL_DIR (/tmp/bench_gpu_models), and reused by later calls on the warm machine.
--budget S starts a variant only if its estimate (ESTIMATE_S) fits in the S seconds left, and bench_gpu.json
is rewritten after every variant, so a call cut short still brings back what it measured.
Estimated seconds on an H100, process start to result (mlx and torch rows from earlier calls, the rest
guessed; +20% with :all; +60 s where the checkpoint is written): peak 20, mlx / mlx+ckpt 25, mlx-4bit 30-35,
torch 30, torch-liger 45 (Triton JIT), torch-4bit 70, torch-compile 120-130 (one layer's forward and
backward compiled, twice: layer 0's input needs no gradient), unsloth 120-125, unsloth-4bit 140-145. Groups
(`--group G --list` prints the schedule): bf16-qv ~420 s, bf16-all ~410, ckpt ~440, 4bit-qv ~420, 4bit-all
~420, rest ~420; all six are ~2,500 s, more than one session's device time: take them in the order above.

`lora-tui train` end to end against this bench's `mlx` step on the same shape: bench/bench_gpu_e2e.py.

On a CPU, BENCH_GPU_SMOKE=1 runs the tiny shape to check the plumbing (BENCH_PEER_PYTHON: the Python for the
PyTorch-side variants, if not this one; UNSLOTH_ALLOW_CPU=1 lets Unsloth import without a GPU).

FLOPs per token (for MFU): 4 x N (forward 2N, backward to the inputs 2N; the frozen base gets no weight
gradients) + attention 12 x layers x seq x d (QK^T and AV, forward 4·L·S·d, backward twice that; PaLM's
convention, no causal discount), N = all parameters except the input embedding. LoRA's own FLOPs are left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
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
# BENCH_TIMED: a longer timed stretch, as long as the one it is compared with (bench_gpu_e2e.py --same-window): a
# GPU under its power cap slows after its first seconds of load, which a 10-step stretch barely sees.
TIMED = int(os.environ.get("BENCH_TIMED", TIMED))
TARGETS = {"qv": ["q_proj", "v_proj"],  # LoRA on q/v (the seed's), or on all seven linear layers of a block
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
sys.modules.setdefault("bench_gpu", sys.modules[__name__])  # run as a script: bench_gpu_peers imports from here
import bench_gpu_peers as peers  # noqa: E402  (after the constants it imports)


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
    mx.synchronize()
    # Queued as one graph and waited for once, as PyTorch's calls below are. Evaluated one by one (as before
    # 2026-12-05) each call also paid a wait: 0.80x of PyTorch, where the kernels are the same cuBLAS kernels
    # and take the same time (bench/probe_gemm.py under ncu).
    outs = [a @ b for _ in range(20)]
    t0 = time.perf_counter()
    mx.eval(outs)
    mx.synchronize()
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


def build_model(layers: int, bits: int | None, dropout: float = 0.05, dense_forward: bool = True, lean: bool = True,
                targets: str = "qv"):
    """The bench model with the seed's LoRA (on q/v, or on all seven linear layers: TARGETS), ready to train as
    TrainingRun would (also used by probe_gpu.py)."""
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    from engine.model import lean as lean_autograd
    from engine.model.adapters import apply_lora
    from engine.config.schema import LoRAConfig
    lean_autograd.SPLIT_TOKENS = int(os.environ.get("BENCH_SPLIT_TOKENS", "0"))  # probe: adapter gradients split-K
    # probe: BENCH_FUSE_QKV=0/1 forces the frozen q/k/v projections apart / into one matmul
    # (default: lean.FUSE_QKV, FUSE_QKV_QUANTIZED)
    if os.environ.get("BENCH_FUSE_QKV") in ("0", "1"):
        lean_autograd.FUSE_QKV = lean_autograd.FUSE_QKV_QUANTIZED = os.environ["BENCH_FUSE_QKV"] == "1"
    if "BENCH_CE_CHUNK_BYTES" in os.environ:  # probe: 0 = the head's logits at once, kept for the backward pass
        from engine.train import losses
        losses.CE_CHUNK_BYTES = int(os.environ["BENCH_CE_CHUNK_BYTES"])
    if os.environ.get("BENCH_CHECKPOINTED_MLP") in ("0", "1"):  # probe: the frozen MLP's own recompute under ckpt
        from engine.model import checkpointed_mlp
        checkpointed_mlp.CHECKPOINTED_MLP = os.environ["BENCH_CHECKPOINTED_MLP"] == "1"
        checkpointed_mlp.CHUNKS = int(os.environ.get("BENCH_MLP_CHUNKS", checkpointed_mlp.CHUNKS))
    if os.environ.get("BENCH_CHECKPOINTED_LORA_MLP") in ("0", "1"):  # probe: the adapted MLP's own recompute
        from engine.model import checkpointed_lora_mlp
        checkpointed_lora_mlp.CHECKPOINTED_LORA_MLP = os.environ["BENCH_CHECKPOINTED_LORA_MLP"] == "1"
    if os.environ.get("BENCH_SWIGLU_KERNEL") in ("0", "1"):  # probe: the fused SwiGLU gradient by ops / one kernel
        from engine.model import swiglu_cuda
        swiglu_cuda.USE_KERNEL = os.environ["BENCH_SWIGLU_KERNEL"] == "1"
    if os.environ.get("BENCH_LORA_KERNELS") in ("0", "1"):  # the adapters' dropout by ops / inside the products
        from engine.model import lora_cuda
        lora_cuda.USE_KERNELS = os.environ["BENCH_LORA_KERNELS"] == "1"
    if os.environ.get("BENCH_FLAT_UPDATE") in ("0", "1"):  # the optimizer array by array / over one flat vector
        from engine.train import flat_update
        flat_update.FLAT_UPDATE = os.environ["BENCH_FLAT_UPDATE"] == "1"
    if os.environ.get("BENCH_FIXED_SEED") == "1":  # probe: every adapter's mask from one constant seed, no random ops
        from engine.model import lean, philox
        seeded = lean.dropout_seed  # where it would draw a seed (CUDA, outside checkpointed blocks): a constant one
        lean.dropout_seed = lambda: (mx.array([1234, 5678], dtype=mx.int32)
                                     if philox.philox_masks() and not philox.in_keyed_block() else seeded())

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
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0, dropout=dropout, target_modules=TARGETS[targets]), lean=lean)
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
             queue_limit: bool = True, compiled_update: bool = True, targets: str = "qv",
             dropout: float = 0.05) -> dict:
    model = build_model(SHAPE["layers"], bits, dropout=dropout, dense_forward=dense_forward, lean=lean,
                        targets=targets)
    import mlx.core as mx
    import mlx.optimizers as optim

    from engine.model.adapters import trainable_count
    from engine.model.memory import AdapterPlacement, ModelShape, estimate_step_memory, fused_attention, \
        limit_gpu_queue
    from engine.train.flat_update import FlatUpdate, flat_parameters
    from engine.train.losses import estimated_logit_rows
    from engine.train.step import accumulate_gradients, apply_update, build_micro_step, build_update, \
        checkpointed_layers, clip_gradients

    # What TrainingRun does: estimate the step, then cap MLX's queue near it (training.memory_limit_gb, 0 = auto).
    shape = ModelShape.of(model)
    estimate = estimate_step_memory(shape, mx.get_active_memory(), trainable_count(model), BATCH, SEQ, 1.0, ckpt, 2,
                                    fused_attention(), AdapterPlacement.of(model, ckpt), quantized=bits is not None,
                                    logit_rows=estimated_logit_rows(model, 2, ckpt))
    if queue_limit:
        if "BENCH_QUEUE_HEADROOM" in os.environ:
            estimate = dataclasses.replace(estimate, queue_headroom=float(os.environ["BENCH_QUEUE_HEADROOM"]))
        limit_gpu_queue(estimate, float(os.environ.get("BENCH_MEMORY_LIMIT_GB", "0")))
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(model.trainable_parameters())
    weights_bytes = mx.get_active_memory()
    batch = random_batch()

    vector = flat_parameters(model, optimizer) if compiled_update else None  # as TrainingRun does
    queued = compiled_update and queued_steps(os.environ.get("BENCH_LOOK_AHEAD"), vector)
    with checkpointed_layers(model, ckpt):
        micro_step = build_micro_step(model, optimizer, vector)
        update = None if queued else FlatUpdate(model, optimizer, vector) if vector else build_update(model, optimizer)

        def waited_step():  # each step read before the next is built (as before the look-ahead)
            grads, loss = accumulate_gradients(micro_step, [batch])
            if compiled_update:
                grads, norm = clip_gradients(grads, 1.0)
                update(grads)
            else:  # what the engine did before: clipping and the optimizer op by op
                grads, norm = optim.clip_grad_norm(grads, 1.0)
                apply_update(model, optimizer, grads)
            return loss.item()

        step = queued_step(model, optimizer, micro_step, batch, vector) if queued else waited_step
        loss, dt = timed_steps(step)
        loss = step.last_loss() if queued else loss
    return dict(tokens_per_s=BATCH * SEQ * TIMED / dt, step_s=dt / TIMED, peak_gb=mx.get_peak_memory() / 1e9,
                weights_gb=weights_bytes / 1e9, loss=loss, estimate_gb=estimate.total / 1e9,
                memory_limit_gb=mx.get_memory_limit() / 1e9, trainable=trainable_count(model), look_ahead=queued,
                flat_update=vector is not None, graph_ops=os.environ.get("MLX_MAX_OPS_PER_BUFFER", "mlx default"))


def queued_step(model, optimizer, micro_step, batch, vector=None):
    """The step as TrainingRun takes it on CUDA (engine/train/step_queue.py): gradients, clipping and the
    guarded update queued with async_eval, and step N's loss read only once step N+1 is queued. Timings of
    the host's part go to $BENCH_TIMES when set (build: the graph in Python; queue: async_eval's encoding)."""
    import mlx.core as mx

    from engine.train.flat_update import FlatUpdate
    from engine.train.step import accumulate_gradients, build_guarded_update, clip_gradients
    update = FlatUpdate(model, optimizer, vector, guarded=True) if vector else build_guarded_update(model, optimizer)
    previous, healthy = [], None
    times = open(os.environ["BENCH_TIMES"], "a") if os.environ.get("BENCH_TIMES") else None

    def step():
        nonlocal healthy
        t0 = time.perf_counter()
        grads, loss = accumulate_gradients(micro_step, [batch])
        grads, norm = clip_gradients(grads, 1.0)
        finite = mx.isfinite(loss) & mx.isfinite(norm)
        healthy = finite if healthy is None else healthy & finite
        t1, c1 = time.perf_counter(), time.thread_time()
        update(grads, healthy, loss, norm)
        t2, c2 = time.perf_counter(), time.thread_time()
        previous.append(loss)
        out = previous.pop(0).item() if len(previous) > 1 else loss.item()  # the step before's, once going
        if times:
            print(f"build {1e3 * (t1 - t0):.1f} ms, queue {1e3 * (t2 - t1):.1f} ms (cpu {1e3 * (c2 - c1):.1f}), "
                  f"wait {1e3 * (time.perf_counter() - t2):.1f} ms", file=times, flush=True)
        return out

    step.last_loss = lambda: previous[-1].item()  # the last step's own loss, for the results
    return step


def queued_steps(switch: str | None, vector) -> bool:
    """Whether the step queues the next before reading this one: as TrainingRun does (on CUDA with the flat
    update, unless LORA_TUI_LOOK_AHEAD says), or as BENCH_LOOK_AHEAD=0/1 says."""
    from engine.train import step_queue
    if switch in ("0", "1"):
        step_queue.LOOK_AHEAD = switch == "1"
    return step_queue.look_ahead_applies(True, None, vector)


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


def mlx_preference_step(method: str, bits: int | None = None, targets: str = "qv") -> dict:
    """A KTO / DPO / ORPO optimizer step through engine/train/objective.py (the step TrainingRun takes), on
    BATCH sequences of SEQ random tokens, each a 64-token prompt and its answer: KTO scores BATCH rows and runs
    its z0 forward over BATCH mismatched pairs; DPO/ORPO take BATCH // 2 pairs, so every variant puts BATCH
    sequences through the gradient pass, as `mlx` does. Reference log-probs are given (scored before step 1)."""
    model = build_model(SHAPE["layers"], bits, dropout=0.0, targets=targets)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from engine.config.schema import Config
    from engine.data import Encoded, Example
    from engine.model.adapters import trainable_count
    from engine.model.memory import AdapterPlacement, ModelShape, estimate_step_memory, fused_attention, \
        limit_gpu_queue
    from engine.train.objective import PreferenceObjective
    from engine.train.preference_batches import PreferenceRows
    from engine.train.step import build_update, clip_gradients

    rows = BATCH if method == "kto" else BATCH // 2
    estimate = estimate_step_memory(ModelShape.of(model), mx.get_active_memory(), trainable_count(model), BATCH,
                                    SEQ, 1.0, False, 2, fused_attention(), AdapterPlacement.of(model),
                                    quantized=bits is not None)
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


VARIANTS = {  # each takes (targets, dropout); "peak" and the preference steps ignore the dropout
    "peak": lambda t, d: matmul_peak(),
    "mlx": lambda t, d: mlx_step(False, None, targets=t, dropout=d),
    "mlx-nolimit": lambda t, d: mlx_step(False, None, queue_limit=False, targets=t, dropout=d),
    "mlx-eager": lambda t, d: mlx_step(False, None, compiled_update=False, targets=t, dropout=d),
    "mlx-stock": lambda t, d: mlx_step(False, None, lean=False, queue_limit=False, targets=t, dropout=d),
    "mlx+ckpt": lambda t, d: mlx_step(True, None, targets=t, dropout=d),
    "mlx-4bit": lambda t, d: mlx_step(False, 4, targets=t, dropout=d),
    "mlx-4bit-qfwd": lambda t, d: mlx_step(False, 4, dense_forward=False, targets=t, dropout=d),
    "mlx-4bit+ckpt": lambda t, d: mlx_step(True, 4, targets=t, dropout=d),
    "mlx-kto": lambda t, d: mlx_preference_step("kto", targets=t),
    "mlx-dpo": lambda t, d: mlx_preference_step("dpo", targets=t),
    "mlx-orpo": lambda t, d: mlx_preference_step("orpo", targets=t),
    "mlx-4bit-kto": lambda t, d: mlx_preference_step("kto", 4, targets=t),
    "mlx-4bit-dpo": lambda t, d: mlx_preference_step("dpo", 4, targets=t),
    **peers.VARIANTS,
}
OURS = ("mlx", "mlx+ckpt", "mlx-4bit", "mlx-4bit+ckpt")  # compared with the fastest peer at the same setting
GROUPS = {  # --group NAME: lists that each fit one device call (600 s); see the docstring for the estimates
    "ours": [n for n in VARIANTS if n not in peers.VARIANTS or n in ("torch", "torch+ckpt")],  # the old default
    "bf16-qv": ["peak", "mlx", "torch", "torch-liger", "unsloth", "torch-compile"],
    "bf16-all": ["mlx:all", "torch:all", "torch-liger:all", "unsloth:all", "torch-compile:all"],
    "ckpt": ["mlx+ckpt", "torch+ckpt", "unsloth+ckpt", "torch-liger+ckpt",
             "mlx+ckpt:all", "torch+ckpt:all", "unsloth+ckpt:all"],
    "4bit-qv": ["mlx-4bit", "unsloth-4bit", "mlx-4bit+ckpt", "unsloth-4bit+ckpt", "torch-4bit"],
    "4bit-all": ["mlx-4bit:all", "unsloth-4bit:all", "mlx-4bit+ckpt:all", "unsloth-4bit+ckpt:all"],
    "rest": ["torch-liger+ckpt:all", "torch-4bit:all", "torch-compile+ckpt", "torch-compile+ckpt:all"],
}
ESTIMATE_S = {"peak": 20, "mlx-4bit": 30, "mlx-4bit+ckpt": 35, **peers.ESTIMATE_S}  # others: 25 s


def split_name(name: str, check: bool = True) -> tuple[str, str]:
    """("mlx+ckpt", "all") for "mlx+ckpt:all"; a name without a suffix means q/v."""
    base, _, targets = name.partition(":")
    if check and (base not in VARIANTS or (targets or "qv") not in TARGETS):
        raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, optionally :all or :qv")
    return base, targets or "qv"


def needs_checkpoint(name: str) -> bool:
    """Whether the variant loads the saved random checkpoint (written by the first one that needs it)."""
    return split_name(name)[0].startswith(("unsloth", "torch-4bit"))


def estimate_s(name: str, checkpoint_pending: bool) -> float:
    """Seconds a variant should take on an H100 (ESTIMATE_S, +20% with all seven targets), + 60 s where it has to
    write the random checkpoint first."""
    base, targets = split_name(name)
    return ESTIMATE_S.get(base, 25) * (1.2 if targets == "all" else 1) + \
        (60 if checkpoint_pending and needs_checkpoint(name) else 0)


def row_name(base: str, targets: str) -> str:
    return base if targets == "qv" or base == "peak" else f"{base}:{targets}"


def versions() -> dict:
    out = {}
    for name in ("mlx", "mlx_lm", "torch", "transformers", "peft", "triton", "liger_kernel", "unsloth", "unsloth_zoo",
                 "bitsandbytes"):
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


def run_child(name: str, dropout: float, timeout: float) -> dict:
    """One variant in its own process (its own process group, killed whole on timeout); its RESULT line, with
    the lines where Unsloth or Liger say what they patched."""
    base, _ = split_name(name)
    peer = base in peers.VARIANTS
    exe = os.environ.get("BENCH_PEER_PYTHON", sys.executable) if peer else sys.executable
    env = {**os.environ, **(peers.OFFLINE if peer else {})}
    proc = subprocess.Popen([exe, __file__, "--variant", name, "--dropout", str(dropout)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    r = json.loads(line[7:]) if line else {"error": (f"timed out after {timeout:.0f} s; " if timed_out else "")
                                            + (err or out)[-800:]}
    notes = [x.strip()[:300] for x in (out + "\n" + err).splitlines()
             if any(w in x.lower() for w in ("unsloth", "liger", "patched")) and not x.startswith("RESULT ")]
    if peer and notes and "error" not in r:
        r["log"] = list(dict.fromkeys(notes))[:20]
    return r


def report(results: dict, fpt: float) -> None:
    """The table of every row (against PyTorch + PEFT eager at the same targets), then ours against the fastest
    peer at the same targets, checkpointing and base precision."""
    peak = results.get("peak", {}).get("mlx_tflops")
    print(f"flops/token {fpt / 1e9:.1f} GFLOP; matmul peak (bf16 8192^3): MLX {peak or 0:.0f}, "
          f"PyTorch {results.get('peak', {}).get('torch_tflops', 0):.0f} TFLOP/s")
    print(f"{'variant':<24}{'tokens/s':>10}{'step s':>8}{'peak GB':>9}{'resv GB':>9}{'vs torch tok/s':>16}"
          f"{'vs torch mem':>14}{'MFU':>7}")
    nan = float("nan")
    for name, r in results.items():
        if name == "peak" or "tokens_per_s" not in r:
            continue
        base = results.get(row_name("torch", r.get("targets", "qv")), {})
        speed = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else nan
        mem = r["peak_gb"] / base["peak_gb"] if base.get("peak_gb") else nan
        mfu = r["tokens_per_s"] * fpt / (peak * 1e12) if peak else nan
        print(f"{name:<24}{r['tokens_per_s']:>10.0f}{r['step_s']:>8.3f}{r['peak_gb']:>9.1f}"
              f"{r.get('reserved_gb', nan):>9.1f}{speed:>15.2f}x{mem:>13.2f}x{mfu:>7.0%}")
    for name, r in results.items():  # the preference steps against the SFT step on the same base, same call
        sft = results.get(row_name("mlx-4bit" if "4bit" in name else "mlx", r.get("targets", "qv")), {})
        if any(m in name for m in ("kto", "dpo", "orpo")) and "step_s" in r and "step_s" in sft:
            print(f"{name:<24} step {r['step_s'] / sft['step_s']:.2f}x, peak {r['peak_gb'] / sft['peak_gb']:.2f}x "
                  "the SFT step's")

    def setting(base):
        return "+ckpt" in base, "4bit" in base

    print(f"\n{'ours':<20}{'tokens/s':>10}{'peak GB':>9}  {'fastest peer, same setting':<26}{'tokens/s':>10}"
          f"{'peak GB':>9}{'speed':>8}{'memory':>8}")
    rows = {n: split_name(n, check=False) for n, r in results.items() if "tokens_per_s" in r}
    for name, (base, targets) in rows.items():
        if base not in OURS:
            continue
        r = results[name]
        same = [(n, results[n]) for n, (b, t) in rows.items()
                if b in peers.VARIANTS and t == targets and setting(b) == setting(base)]
        if not same:
            print(f"{name:<20}{r['tokens_per_s']:>10.0f}{r['peak_gb']:>9.1f}  (no peer at this setting)")
            continue
        n, p = max(same, key=lambda x: x[1]["tokens_per_s"])
        print(f"{name:<20}{r['tokens_per_s']:>10.0f}{r['peak_gb']:>9.1f}  {n:<26}{p['tokens_per_s']:>10.0f}"
              f"{p['peak_gb']:>9.1f}{r['tokens_per_s'] / p['tokens_per_s']:>7.2f}x"
              f"{r['peak_gb'] / p['peak_gb'] if p['peak_gb'] else nan:>7.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", help="run one variant in this process and print its JSON")
    ap.add_argument("--only", nargs="*", default=None,
                    help="variants (NAME or NAME:all / NAME:qv); default: --group ours, the rows before issue 22")
    ap.add_argument("--group", nargs="*", default=[], choices=list(GROUPS), help="preset lists (see GROUPS)")
    ap.add_argument("--targets", nargs="+", default=["qv"], choices=list(TARGETS),
                    help="LoRA targets for --only names without a suffix: q/v, all seven linear layers, or both")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of every variant")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="run the list this many times, interleaved; report medians")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds: start a variant only if its estimate fits in what is left (0: no limit)")
    ap.add_argument("--merge", nargs="+", help="print the tables of saved bench_gpu.json files (later files win)")
    ap.add_argument("--list", action="store_true", help="print what would run, with estimates, and stop")
    args = ap.parse_args()
    if args.variant:
        base, targets = split_name(args.variant)
        r = VARIANTS[base](targets, args.dropout)
        if base != "peak":
            r.update(targets=targets, dropout=args.dropout)
        if base in peers.VARIANTS:  # this process's libraries (the parent may run another Python for peers)
            from importlib.metadata import version
            r["lib"] = {m: version(m.replace("_", "-")) for m in ("torch", "transformers", "peft", "triton",
                        "liger_kernel", "unsloth", "unsloth_zoo", "bitsandbytes") if m in sys.modules}
        print("RESULT " + json.dumps(r), flush=True)
        return
    if args.merge:
        results = {}
        for f in args.merge:
            results.update(json.loads(Path(f).read_text())["results"])
        report(results, flops_per_token())
        return

    names = [n for g in args.group for n in GROUPS[g]]
    for n in (args.only if args.only is not None else ([] if args.group else GROUPS["ours"])):
        names += [n] if ":" in n or n == "peak" else [row_name(n, t) for t in args.targets]
    schedule = [n for i in range(args.repeat) for n in names if i == 0 or n != "peak"]
    for n in schedule:
        split_name(n)  # a misspelt name stops here, before anything runs
    if args.list:
        pending, total = not (peers.model_dir() / "config.json").exists(), 0.0
        for n in schedule:
            total += (e := estimate_s(n, pending))
            pending = pending and not needs_checkpoint(n)
            print(f"{n:<26}{e:>5.0f} s")
        print(f"{'total':<26}{total:>5.0f} s (estimates for an H100; checkpoint dir {peers.model_dir()})")
        return
    started, results, runs = time.perf_counter(), {}, {}
    for name in schedule:
        estimate = estimate_s(name, not (peers.model_dir() / "config.json").exists())
        left = args.budget - (time.perf_counter() - started) if args.budget else 1e9
        if left < estimate:
            print(f"{name}: skipped, {left:.0f} s of the budget left, estimate {estimate:.0f} s", flush=True)
            continue
        t0 = time.perf_counter()
        r = run_child(name, args.dropout, min(left, max(240, 3 * estimate)))
        print(f"{name}: {r}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        runs.setdefault(name, []).append(dict(r, wall_s=time.perf_counter() - t0))
        results = {n: median_run(rs, "tokens_per_s", "runs_tokens_per_s") for n, rs in runs.items()}
        if args.out:  # after every variant: a call cut off at its limit still brings back what it measured
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "bench_gpu.json").write_text(json.dumps(
                {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "flops_per_token": flops_per_token(),
                 "dropout": args.dropout, "results": results}, indent=1))
    print(f"\nversions: {versions()}")
    report(results, flops_per_token())


if __name__ == "__main__":
    main()
