"""Memory: the readings taken while a run trains (memory_stats), and the peak-memory estimate of a LoRA
training step, made before training starts so that a run that cannot fit is caught in seconds rather than
after the model has loaded and the machine has started to swap.

What a step holds at its peak (float32 on CPU; counted from the tensors autograd keeps, then checked
against MLX's measured peak on the embedded model, see tests/test_memory.py):
- the weights as loaded, plus the adapters with their gradients and two AdamW moments;
- per token, in each block from the first adapted one up (blocks below have no backward pass), the saved
  activations (engine/model/lean.py's backward passes): the block input, the residual, q and the attention
  output, k and v after RoPE, the MLP's gate and up (2 intermediate vectors), and the inputs that only
  adapters read (AdapterPlacement): the attention's for q/k/v, o_proj's, the MLP's for gate/up and down_proj's
  (intermediate wide), plus each adapter's boolean dropout mask (on CUDA outside checkpointed blocks only
  its seed); DoRA over a quantized base also keeps its dequantized weight (AdapterPlacement.dense_bases);
- per layer, the attention probabilities (batch x heads x length^2) where attention is not fused under
  autograd (Metal); MLX's CUDA backend keeps only q, k, v and the output, and on the CPU
  engine/model/cpu_attention.py recomputes them in the backward pass, one layer's (~3 copies) at a time;
- for the trained positions only (masked_loss gathers them first), the logits with their softmax and
  gradients: about four (tokens x vocabulary) float32 copies, of one chunk of rows where the head runs in
  chunks (engine/train/losses.py).
With gradient checkpointing only each trained block's input is kept, plus one block's activations while it
is recomputed, and their gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from engine.protocol import MemoryStats

ATTENTION_COPIES = 1.1  # probabilities kept for the backward pass, plus transient scores
RECOMPUTED_COPIES = 3.0  # one layer's recomputed probabilities, their gradient and the product's
LOGIT_COPIES = 4.0  # logits, log-softmax, their gradient and the float32 cast


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        a = model.args
        heads = a.num_attention_heads
        head_dim = getattr(a, "head_dim", None) or a.hidden_size // heads
        kv = getattr(a, "num_key_value_heads", None) or heads
        return cls(a.num_hidden_layers, a.hidden_size, kv * head_dim, a.intermediate_size, heads, a.vocab_size)


# Adapted layers that read the same input share the one copy lean.py keeps of it.
_SHARED_INPUTS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                  "gate_proj": "mlp", "up_proj": "mlp"}


@dataclass(frozen=True)
class AdapterPlacement:
    """Where the adapters sit, as far as memory goes: how many blocks keep activations for the backward
    pass, and what the adapters keep per token and block beyond what the frozen layers keep."""
    trained_layers: int  # blocks from the first adapted one up
    kept_inputs: int  # values: the distinct inputs of adapted layers (one copy per shared input)
    mask_bytes: int  # stored boolean dropout masks, one byte a value (0 where masks are seeds)
    dora: bool = False  # DoRA layers keep mlx-lm's autograd: counted roughly, and the GPU limit keeps its margin
    dense_bases: int = 0  # values a block: DoRA over a quantized base keeps its dequantized weight for backward

    @classmethod
    def of(cls, model, grad_checkpoint: bool = False) -> "AdapterPlacement":
        """Read off a model with adapters applied (engine/model/adapters.apply_lora)."""
        import mlx.nn as nn
        from mlx_lm.tuner.dora import DoRALinear
        from mlx_lm.tuner.lora import LoRALinear

        from engine.model import lean, philox
        seeded = lean.SEEDED_DROPOUT and philox.philox_masks() and not grad_checkpoint
        layers = list(getattr(model, "layers", []))
        adapters = [[(path, m) for path, m in layer.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
                    for layer in layers]
        adapted = [i for i, found in enumerate(adapters) if found]
        if not adapted:
            return cls(0, 0, 0)
        inputs, masks, dora, dense = {}, 0, False, 0
        for path, m in adapters[adapted[-1]]:  # mlx-lm adapts the top blocks alike: the top one stands for all
            width, is_dora = m.lora_a.shape[0], isinstance(m, DoRALinear)
            dora |= is_dora
            if is_dora:  # its own float32 copy of the input (two 16-bit values) and its output
                inputs[path] = 2 * width + m.lora_b.shape[1]
                if isinstance(m.linear, nn.QuantizedLinear):  # x @ dequantize(w).T keeps the dense w
                    dense += width * m.lora_b.shape[1]
            else:
                inputs[_SHARED_INPUTS.get(path.rsplit(".", 1)[-1], path)] = width
            masks += width if m.dropout._p_1 < 1 and (is_dora or not seeded) else 0
        return cls(len(layers) - adapted[0], sum(inputs.values()), masks, dora, dense)


QUEUE_HEADROOM = 1.15  # where a limit at the estimate itself was slower or not measured
EXACT_HEADROOM = 1.0  # CUDA, 16-bit base, LoRA: without checkpointing, or with it and one input a block (q/v)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    adapters: int
    activations: int
    attention: int
    logits: int
    queue_headroom: float = QUEUE_HEADROOM  # the automatic GPU memory limit as a multiple of the total

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.activations + self.attention + self.logits

    def describe(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        return (f"{gb(self.total)} (weights {gb(self.weights)}, activations {gb(self.activations)}, "
                f"attention {gb(self.attention)}, logits {gb(self.logits)}, adapters {gb(self.adapters)})")


def estimate_step_memory(shape: ModelShape, weight_bytes: int, trainable: int, batch: int, length: int,
                         trained_fraction: float = 1.0, grad_checkpoint: bool = False,
                         act_bytes: int = 4, fused_attention: bool | None = None,
                         placement: AdapterPlacement | None = None, quantized: bool = False,
                         logit_rows: int | None = None) -> MemoryEstimate:
    """Peak bytes of one micro-step on `batch` rows of `length` tokens, `trained_fraction` of them trained.
    fused_attention: True keeps no probabilities, False keeps every layer's, None: as this device does.
    placement: AdapterPlacement.of(model); None = adapters on every block reading the attention's input, no
    masks kept (q/v on CUDA). logit_rows: the most trained rows whose logits exist at once (a training step's
    head in chunks: losses.head_chunk_rows); None: all of them."""
    tokens = batch * length
    placement = placement or AdapterPlacement(shape.layers, shape.hidden, 0)
    layers = placement.trained_layers
    per_token_layer = (4 * shape.hidden + 2 * shape.kv_dim + 2 * shape.intermediate + placement.kept_inputs
                       + placement.mask_bytes / act_bytes)
    if grad_checkpoint:  # the recomputed block's activations and, while its backward runs, their gradients
        activations = tokens * (layers * shape.hidden + 2 * per_token_layer) if layers else 0
    else:
        activations = tokens * layers * per_token_layer
    # every block's even when checkpointing: nothing ties mlx-lm's dequantize to the block's input, so MLX may run
    # them all early and hold the copies (qlora.py saw that for its own before mx.depends); not measured
    activations += placement.dense_bases * layers
    kept = attention_kept() if fused_attention is None else ("none" if fused_attention else "kept")
    probabilities = batch * shape.heads * length * length
    if kept == "kept":  # every layer's, or one block's while checkpointing recomputes it
        attention = ATTENTION_COPIES * probabilities * (min(1, layers) if grad_checkpoint else layers)
    else:  # none, or one layer's recomputed at a time
        attention = RECOMPUTED_COPIES * probabilities if kept == "recomputed" and layers else 0
    trained_rows = tokens * min(max(trained_fraction, 0.0), 1.0)
    logits = LOGIT_COPIES * min(trained_rows, logit_rows or trained_rows) * shape.vocab * 4
    return MemoryEstimate(int(weight_bytes), int(trainable * 4 * 4), int(activations * act_bytes),
                          int(attention * act_bytes), int(logits),
                          queue_headroom(grad_checkpoint, quantized, placement.dora,
                                         placement.kept_inputs <= shape.hidden))


def queue_headroom(grad_checkpoint: bool, quantized: bool, dora: bool = False, one_input: bool = False) -> float:
    """The automatic GPU memory limit as a multiple of the step's estimate. Measured on an H100, Mistral-7B
    shape (bench/RESULTS.md): with a 16-bit base, LoRA and no checkpointing a limit at the estimate runs at
    full speed (q/v: 30 GB against an estimate of 30.2; all seven layers: 36.6 against 36.6) and saves ~5 GB
    on q/v. With checkpointing and q/v (one_input: the adapters keep one input a block) the estimate itself
    runs at full speed at 10 ops a CUDA graph (engine/cuda_graphs.py; twentieth session: 12,452-12,794 tok/s at
    17.31 GB, against 12,726 at 1.03x and 12,549 at 1.1x; at MLX's 100 ops it lost 4%). All seven layers with
    checkpointing lost 7% at 1.05x even at 10 ops, so they keep 1.15x (1.1x: level, 0.36 GB less, one pair).
    Quantized bases, DoRA and Metal were not measured below 1.15x."""
    if not fused_attention() or quantized or dora or (grad_checkpoint and not one_input):
        return QUEUE_HEADROOM
    return EXACT_HEADROOM


def fused_attention() -> bool:
    """Whether attention under autograd keeps no probabilities: MLX's CUDA backend (cuDNN, both passes)."""
    from engine.model.loading import on_cuda
    return on_cuda()


def attention_kept() -> str:
    """What a training step's attention keeps for the backward pass on this device: "none" (CUDA),
    "recomputed" (the CPU: engine/model/cpu_attention.py) or "kept" (Metal: MLX's unfused fallback)."""
    from engine.model.loading import on_gpu
    if not on_gpu():
        return "recomputed"
    return "none" if fused_attention() else "kept"


def gpu_memory_limit(estimate: MemoryEstimate | None, configured_gb: float) -> int | None:
    """The memory limit to give MLX on a GPU (bytes), or None to leave MLX's default.

    A GPU backend queues work ahead of the device, and queued work holds its temporaries until it has run:
    at Mistral-7B shapes that was ~7 GB above what the step needs (bench/RESULTS.md). Over its memory limit
    MLX waits for queued work to finish before queuing more, so a limit near the step's real need removes
    that excess; a limit set too low costs speed, never a failed step."""
    from engine.model.loading import on_gpu
    if not on_gpu():
        return None
    if configured_gb > 0:
        return int(configured_gb * 1e9)
    return int(estimate.total * estimate.queue_headroom) if estimate is not None else None


def limit_gpu_queue(estimate: MemoryEstimate | None, configured_gb: float) -> int | None:
    """Set MLX's memory limit to gpu_memory_limit(...) where that gives one; return the limit (bytes).
    TrainingRun.run puts MLX's limit back when the run ends."""
    limit = gpu_memory_limit(estimate, configured_gb)
    if limit is not None:
        import mlx.core as mx
        mx.set_memory_limit(limit)
    return limit


def available_bytes() -> int:
    """Memory a training step may still take: the GPU's recommended working set where there is one, else the
    system's available RAM (what the process already holds is counted back in)."""
    import mlx.core as mx
    if mx.default_device() == mx.gpu:
        try:
            info = mx.device_info()
            limit = info.get("max_recommended_working_set_size") or info.get("memory_size")
            if limit:
                return int(limit)
        except Exception:
            pass
    return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)


_PROCESS = psutil.Process()


def memory_stats() -> MemoryStats:
    import mlx.core as mx
    vm = psutil.virtual_memory()
    return MemoryStats(rss_bytes=_PROCESS.memory_info().rss, system_used_bytes=vm.total - vm.available,
                       system_total_bytes=vm.total, mlx_active_bytes=mx.get_active_memory(),
                       mlx_peak_bytes=mx.get_peak_memory())
