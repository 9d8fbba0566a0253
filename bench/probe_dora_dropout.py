"""Does dropout reach DoRA's adapters on this device? (An H100 run of tests/test_train.py's DoRA checkpointing case
found the keyed and the unkeyed step's losses equal to 2.5e-6; on this CPU the masks move the loss by ~2e-4.)

  python bench/probe_dora_dropout.py [lora|dora] [keep|dequantize] [embedded|random]

Loads the embedded model (on a GPU machine without network: its GGUF in ~/.cache/lora-tui/downloads, see
bench/gpu/session21/README.md), or with `random` builds a small Llama of random weights (the same mlx-lm classes,
no file needed; `keep` quantizes it to 4 bits, as the embedded Q4_1 base stays on a GPU), puts rank-8 adapters with
dropout 0.2 on the last 4 blocks, and prints the training loss of one batch under two seeds and the loss without
dropout. Dropout that works gives three values that differ by more than the step's rounding; two equal training
losses mean the masks did not reach the adapters.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

from engine.config.schema import Config  # noqa: E402
from engine.model.adapters import apply_lora  # noqa: E402
from engine.model.loading import load_model, on_gpu  # noqa: E402
from engine.train.losses import loss_inputs, masked_loss  # noqa: E402


def random_llama(quantized: bool) -> nn.Module:
    """A 6-block Llama of random weights in the dtype load_model would use here (bf16 on a GPU)."""
    from mlx_lm.models import llama
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=6,
                                        intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                                        rms_norm_eps=1e-5, vocab_size=49152))
    dtype = mx.bfloat16 if on_gpu() else mx.float32
    model.update(tree_map(lambda a: a.astype(dtype), model.parameters()))
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def main(kind: str = "dora", base: str = "keep", source: str = "embedded") -> None:
    cfg = Config()
    cfg.lora.rank, cfg.lora.num_layers, cfg.lora.dropout, cfg.lora.use_dora = 8, 4, 0.2, kind == "dora"
    cfg.model.quantized_base = base
    model = load_model(cfg.model)[0] if source == "embedded" else random_llama(base == "keep")
    apply_lora(model, cfg.lora)
    mx.random.seed(3)  # trained-looking adapters: with lora_b at 0 no mask could change the loss
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    tokens = np.random.default_rng(0).integers(0, 40000, (2, 65)).astype(np.int32)
    batch = loss_inputs(tokens[:, :-1], tokens[:, 1:], np.ones((2, 64), bool))

    def train_loss(seed: int) -> float:
        mx.random.seed(seed)
        (loss, _), grads = nn.value_and_grad(model, masked_loss)(model, *batch)
        mx.eval(loss, grads)
        return loss.item()

    model.train()
    seven, eight = train_loss(7), train_loss(8)
    model.eval()
    plain = masked_loss(model, *batch)[0].item()
    layer = model.layers[-1].self_attn.q_proj
    print(f"{kind} on a {base} {source} base, {mx.default_device()}, {type(layer).__name__} over "
          f"{type(getattr(layer, 'linear', layer)).__name__}: seed 7 {seven:.4f}, seed 8 {eight:.4f}, "
          f"no dropout {plain:.4f}; the seeds differ by {abs(seven - eight) / abs(plain):.1e} of the loss")


if __name__ == "__main__":
    main(*sys.argv[1:4])
