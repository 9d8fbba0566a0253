"""LoRA/DoRA adapters through mlx-lm's tuner layers, saved in mlx-lm's own format.

`adapters.safetensors` + `adapter_config.json` in a folder: `mlx_lm.generate --adapter-path` and
`mlx_lm.server` use it as it is.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from engine.config.schema import Config, LoRAConfig
from engine.model.loading import load_model

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
    through engine/model/lean.py's custom backward passes (same gradients, less memory; inference is unchanged)."""
    acfg = adapter_config(cfg, model)
    model.freeze()
    linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"], use_dora=cfg.use_dora)
    if lean:
        from engine.model.lean import lean_autograd
        lean_autograd(model)
    return acfg


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def total_count(model: nn.Module) -> int:
    """Parameters of the model, counting a quantized weight by its logical (unpacked) size."""
    from engine.model.qlora import DequantizingLinear  # a GPU's QLoRA layers: packed like QuantizedLinear
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, DequantizingLinear)):
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


ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")


def adapter_folder(path: str | Path) -> Path:
    """The folder holding a saved adapter: `path` itself (an adapter or checkpoint folder) or, for a run
    folder, its final `adapter/`."""
    raw = str(path)
    try:
        folder = Path(raw).expanduser()
    except RuntimeError:  # `~name` for a user this machine does not have
        raise AdapterError(f"{raw}: cannot expand ~ (no such user here); write the full path") from None
    if not folder.exists():
        raise AdapterError(f"{folder}: no such folder; name an adapter, checkpoint or run folder")
    if not folder.is_dir():
        raise AdapterError(f"{folder}: is a file; name the folder that holds {' and '.join(ADAPTER_FILES)}")
    if not (folder / ADAPTER_FILES[0]).exists() and (folder / "adapter" / ADAPTER_FILES[0]).is_file():
        return folder / "adapter"  # a run folder: its last step's adapter
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        hint = ("a run folder without a final adapter (interrupted?): name one of its checkpoints/step_* folders"
                if (folder / "checkpoints").is_dir() else "name an adapter, checkpoint or run folder")
        raise AdapterError(f"{folder}: not an adapter folder (no {' or '.join(missing)}); {hint}")
    return folder


def _number(value, integer: bool = False) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def adapter_config_problem(acfg) -> str | None:
    """What makes a parsed adapter_config.json unusable (mlx-lm's format, LoRA or DoRA), or None."""
    if not isinstance(acfg, dict):
        return f"must be a JSON object, got {type(acfg).__name__}"
    kind = acfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        return f"fine_tune_type {kind!r}: only lora and dora adapters can be loaded"
    if not _number(acfg.get("num_layers"), integer=True):
        return f"num_layers: {acfg.get('num_layers', 'missing')!r} is not a whole number"
    params = acfg.get("lora_parameters")
    if not isinstance(params, dict):
        return "lora_parameters: missing or not an object (it needs rank, scale and dropout)"
    if not _number(params.get("rank"), integer=True) or params["rank"] < 1:
        return f"lora_parameters.rank: {params.get('rank', 'missing')!r} is not a positive whole number"
    if not _number(params.get("scale")):
        return f"lora_parameters.scale: {params.get('scale', 'missing')!r} is not a finite number"
    if not _number(params.get("dropout")) or not 0 <= params["dropout"] < 1:
        return f"lora_parameters.dropout: {params.get('dropout', 'missing')!r} is not a number in [0, 1)"
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        return f"lora_parameters.keys: {keys!r} is not a list of module names"
    return None


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_FILES[0]
    try:
        acfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AdapterError(f"{path}: not valid JSON ({exc}); save or copy the adapter again") from None
    problem = adapter_config_problem(acfg)
    if problem:
        raise AdapterError(f"{path}: {problem}")
    return acfg


def read_adapter_weights(path: Path) -> dict[str, mx.array]:
    """The tensors of a safetensors file, read in full: a cut, foreign or pickled file fails here, named."""
    try:
        weights = mx.load(str(path), format="safetensors")
        mx.eval(list(weights.values()))
    except (RuntimeError, OSError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"{path}: not a readable safetensors file ({why}); it may be truncated or "
                           "another format (pickles are never loaded): save or copy the adapter again") from None
    return weights


def weights_mismatch(weights: dict[str, mx.array], expected: dict[str, mx.array]) -> str | None:
    """How a file's adapter tensors differ from the ones a model's adapter layers hold, or None."""
    extra = sorted(set(weights) - set(expected))
    if extra:
        return f"{len(extra)} tensor(s) with no place in this model, e.g. {extra[0]}"
    shaped = [k for k in sorted(weights) if weights[k].shape != expected[k].shape]
    if shaped:
        k = shaped[0]
        return f"{k} is {tuple(weights[k].shape)} where this model needs {tuple(expected[k].shape)}"
    missing = sorted(set(expected) - set(weights))
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
    return None


def non_finite(weights: dict[str, mx.array]) -> list[str]:
    return [k for k, w in sorted(weights.items())
            if mx.issubdtype(w.dtype, mx.floating) and not mx.all(mx.isfinite(w)).item()]


def read_saved_adapter(folder: Path) -> tuple[dict, dict[str, mx.array]]:
    """(config, tensors) of the adapter saved in `folder` (adapter_folder's answer), checked before any model
    is loaded: the config's values and a whole safetensors file of finite numbers (mlx-lm's own loader
    takes a NaN scale or NaN weights as they are)."""
    acfg = read_adapter_config(folder)
    weights = read_adapter_weights(folder / ADAPTER_FILES[1])
    bad = non_finite(weights)
    if bad:
        raise AdapterError(f"{folder / ADAPTER_FILES[1]}: {bad[0]} holds NaN or infinite values "
                           f"({len(bad)} tensor(s)); the adapter is broken: use an earlier checkpoint")
    return acfg, weights


def apply_saved_adapter(model: nn.Module, folder: Path, saved: tuple[dict, dict[str, mx.array]],
                        base: str = "this base model") -> None:
    """Freeze `model` and apply read_saved_adapter's answer, refused unless its tensors are exactly the ones,
    with the shapes, this model's adapter layers need (mlx-lm's loader accepts missing ones silently)."""
    acfg, weights = saved
    model.freeze()
    try:
        linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"],
                              use_dora=acfg.get("fine_tune_type") == "dora")
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{folder}: does not fit {base}: {exc}") from None
    mismatch = weights_mismatch(weights, adapter_weights(model))
    if mismatch:
        raise AdapterError(f"{folder}: does not fit {base} ({mismatch}): it was trained for another model "
                           "or other lora settings")
    model.load_weights(list(weights.items()), strict=False)


def load_adapter_weights(model: nn.Module, folder: Path) -> None:
    """Load saved adapter weights into a model that already has the same adapters applied."""
    weights = read_adapter_weights(folder / "adapters.safetensors")
    mismatch = weights_mismatch(weights, adapter_weights(model))
    if mismatch:
        raise AdapterError(f"{folder}: adapter does not match this model/config ({mismatch})")
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


def load_with_adapter(cfg: Config, adapter: str | Path, progress=None):
    """The configured base (same dtype/dequantization as training) with a saved adapter applied: `adapter`
    is an adapter or checkpoint folder, or a run folder (its final adapter/). A missing, broken or mismatched
    adapter raises AdapterError."""
    folder = adapter_folder(adapter)  # the adapter's own files first: a typo or a broken file fails before a
    saved = read_saved_adapter(folder)  # long model load
    model, tokenizer, info = load_model(cfg.model, progress)
    apply_saved_adapter(model, folder, saved, f"the base model {cfg.model.name}")
    model.eval()
    return model, tokenizer, info
