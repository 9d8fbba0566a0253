"""Fuse an adapter into its base model: a directory `mlx_lm.load` opens, checked against base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

from engine import atomic
from engine.config import Config


class FuseError(RuntimeError):
    pass


def load_with_adapter(cfg: Config, adapter: str | Path, progress=None):
    """The configured base (same dtype/dequantization as training) with a saved adapter applied."""
    from mlx_lm.tuner.utils import load_adapters

    from engine.model import load_model
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapters.safetensors").is_file():
        raise FuseError(f"{adapter}: not an adapter folder (needs adapter_config.json and adapters.safetensors)")
    model, tokenizer, info = load_model(cfg.model, progress)
    try:
        load_adapters(model, str(adapter))
    except (ValueError, KeyError) as exc:
        raise FuseError(f"{adapter}: does not fit {cfg.model.name}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer, info


def fuse(cfg: Config, adapter: str | Path, out: str | Path, check_prompt: str = "Hello! Who are you?") -> dict:
    """Write the fused model to `out` (atomically) and check it generates what base + adapter generates."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load as mlx_load
    from mlx_lm.utils import save

    from engine.generate import GenerationSettings, reply
    from engine.model import resolve_model_path

    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise FuseError(f"{out}: exists and is not empty; choose a new folder")
    model, tokenizer, info = load_with_adapter(cfg, adapter)
    settings = GenerationSettings(max_tokens=32, temperature=0.0)
    messages = [{"role": "user", "content": check_prompt}]
    expected = reply(model, tokenizer, messages, settings)
    fused = [(n, m.fuse(dequantize=not info.quantized)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    src = resolve_model_path(cfg.model)
    config = json.loads((src / "config.json").read_text())
    if not info.quantized:  # we trained on dequantized weights: save them so, exactly
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    config["torch_dtype"] = info.dtype
    with atomic.folder(out) as tmp:  # `out` is absent or empty (checked above)
        save(tmp, src, model, tokenizer, config, donate_model=False)
    del model
    mx.clear_cache()
    fused_model, fused_tok = mlx_load(str(out))
    got = reply(fused_model, fused_tok, messages, settings)
    return {"path": str(out), "check_prompt": check_prompt, "adapter_reply": expected, "fused_reply": got,
            "same_greedy_output": got == expected}
