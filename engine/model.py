"""Resolve and load a base model (embedded GGUF import, local directory or hub id) with mlx-lm."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.config import ModelConfig
from engine.embedded import EmbeddedModelError, import_embedded, is_embedded


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class LoadedModelInfo:
    path: str
    model_type: str
    dtype: str
    quantized: bool
    total_params: int


def on_gpu() -> bool:
    import mlx.core as mx
    return mx.default_device() == mx.gpu


def on_cuda() -> bool:
    import mlx.core as mx
    return on_gpu() and mx.cuda.is_available()


def resolve_model_path(cfg: ModelConfig, progress: Callable[[str, float], None] | None = None) -> Path:
    """The local directory holding the model: imported, found on disk, or fetched from the hub."""
    name = cfg.name.strip()
    if is_embedded(name):
        from engine.embedded import cache_root
        root = cache_root() if os.environ.get("LORA_TUI_CACHE") else Path(cfg.cache_dir).expanduser()
        try:
            return import_embedded(progress, root=root)
        except EmbeddedModelError as exc:
            raise ModelLoadError(str(exc)) from None
    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ModelLoadError(f"model.name: {local} is not a directory")
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model.name: {local} has no config.json: not a model directory")
        if not list(local.glob("*.safetensors")):
            raise ModelLoadError(f"model.name: {local} has no .safetensors weights "
                                 "(pickled .bin weights are not loaded, for safety)")
        return local.resolve()
    if name.count("/") != 1:
        raise ModelLoadError(f"model.name: {name!r} is neither `embedded`, an existing directory, "
                             "nor a hub id like org/model")
    from mlx_lm.utils import _download
    try:
        return Path(_download(name))
    except Exception as exc:  # network, auth, missing repo: all end the same way for a user
        raise ModelLoadError(f"model.name: cannot fetch {name!r} from the Hugging Face hub "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             "download it once with network access or name a local directory") from None


def _target_dtype(cfg: ModelConfig):
    import mlx.core as mx
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu() else "float32")
    return getattr(mx, name), name


def load_model(cfg: ModelConfig, progress: Callable[[str, float], None] | None = None):
    """Load (model, tokenizer, info). Casts floating weights to the configured dtype and dequantizes a
    quantized base where configured (auto: on CPU, since quantized matmuls are slow there)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import dequantize_model, load

    path = resolve_model_path(cfg, progress)
    if progress:
        progress(f"loading {path.name}", 0.9)
    try:
        model, tokenizer, config = load(str(path), return_config=True,
                                        trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        raise ModelLoadError(f"model.name: {path}: {str(exc).splitlines()[0]}") from None
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model.name: {path}: {exc}") from None
    quantized = "quantization" in config or "quantization_config" in config
    dequantize = cfg.quantized_base == "dequantize" or (cfg.quantized_base == "auto" and not on_gpu())
    if quantized and dequantize:
        model = dequantize_model(model)
        quantized = False
    dtype, dtype_name = _target_dtype(cfg)
    # Cast only floating leaves: quantized weights are uint32 and must stay so.
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    mx.eval(model.parameters())
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    info = LoadedModelInfo(str(path), config.get("model_type", "?"), dtype_name, quantized, int(total))
    if progress:
        progress("model loaded", 1.0)
    return model, tokenizer, info


def load_tokenizer(cfg: ModelConfig, progress=None):
    """Only the tokenizer (fast: used for dataset validation without loading weights)."""
    from mlx_lm.utils import load_tokenizer as _load_tokenizer
    path = resolve_model_path(cfg, progress)
    eos = None
    try:
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        pass
    return _load_tokenizer(path, eos_token_ids=eos)
