"""LoRA/DoRA adapters through mlx-lm's tuner layers, saved in mlx-lm's own format.

`adapters.safetensors` + `adapter_config.json` in a folder: `mlx_lm.generate --adapter-path` and
`mlx_lm.server` use it as it is.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from engine.config import LoRAConfig

ADAPTER_LEAVES = {"lora_a", "lora_b", "m"}


class AdapterError(ValueError):
    pass


def lora_keys(model: nn.Module, targets: list[str], num_layers: int) -> list[str]:
    """Module paths inside a transformer block (e.g. self_attn.q_proj) whose last name is a target."""
    layers = model.layers if num_layers < 0 else model.layers[-num_layers:]
    found = set()
    for layer in layers:
        for path, module in layer.named_modules():
            if path.rsplit(".", 1)[-1] in targets and isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                found.add(path)
    missing = [t for t in targets if not any(k.rsplit(".", 1)[-1] == t for k in found)]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.layers[0].named_modules()
                        if isinstance(m, (nn.Linear, nn.QuantizedLinear))})
        raise AdapterError(f"lora.target_modules: {', '.join(missing)} not found in this model; its linear "
                           f"layers are: {', '.join(names)}")
    return sorted(found)


def adapter_config(cfg: LoRAConfig, model: nn.Module) -> dict:
    """mlx-lm's adapter_config.json: note mlx-lm wants scale (= alpha / rank), not alpha."""
    n_layers = len(model.layers) if cfg.num_layers < 0 else min(cfg.num_layers, len(model.layers))
    return {
        "fine_tune_type": "dora" if cfg.use_dora else "lora",
        "num_layers": n_layers,
        "lora_parameters": {"rank": cfg.rank, "scale": cfg.alpha / cfg.rank, "dropout": cfg.dropout,
                            "keys": lora_keys(model, cfg.target_modules, cfg.num_layers)},
        "lora_alpha": cfg.alpha,  # ours, for humans; mlx-lm ignores unknown keys
    }


def apply_lora(model: nn.Module, cfg: LoRAConfig, lean: bool = True) -> dict:
    """Freeze the base, add adapters on the configured modules; return the adapter config. `lean`: train
    through engine/lean.py's custom backward passes (same gradients, less memory; inference is unchanged)."""
    acfg = adapter_config(cfg, model)
    model.freeze()
    linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"], use_dora=cfg.use_dora)
    if lean:
        from engine.lean import lean_autograd
        lean_autograd(model)
    return acfg


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def total_count(model: nn.Module) -> int:
    """Parameters of the model, counting a quantized weight by its logical (unpacked) size."""
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += m.weight.size * 32 // m.bits
            total += getattr(m, "bias", mx.zeros(0)).size if "bias" in m else 0
        elif isinstance(m, (nn.Linear, nn.Embedding, nn.RMSNorm, nn.LayerNorm)):
            total += sum(v.size for k, v in m.items() if isinstance(v, mx.array))
    return total


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.trainable_parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


def save_adapters(model: nn.Module, acfg: dict, folder: Path) -> None:
    """Write adapters.safetensors and adapter_config.json into `folder` (the caller makes it atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), adapter_weights(model))
    (folder / "adapter_config.json").write_text(json.dumps(acfg, indent=2))


def load_adapter_weights(model: nn.Module, folder: Path) -> None:
    """Load saved adapter weights into a model that already has the same adapters applied."""
    try:
        weights = mx.load(str(folder / "adapters.safetensors"))
    except Exception as exc:
        raise AdapterError(f"{folder / 'adapters.safetensors'}: unreadable ({exc})") from None
    expected = adapter_weights(model)
    bad = sorted(set(weights) ^ set(expected)) or [k for k in weights if weights[k].shape != expected[k].shape]
    if bad:
        raise AdapterError(f"{folder}: adapter does not match this model/config (first mismatch: {bad[0]})")
    model.load_weights(list(weights.items()), strict=False)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model exactly: swap each LoRA/DoRA layer for its frozen linear, then swap back."""
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
    if swapped:
        model.update_modules(tree_unflatten([(name, m.linear) for name, m in swapped]))
    try:
        yield model
    finally:
        if swapped:
            model.update_modules(tree_unflatten(swapped))
