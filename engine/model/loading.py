"""Resolve and load a base model (embedded GGUF import, local directory or hub id) with mlx-lm."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.config.schema import ModelConfig
from engine.config.validation import FALSE_WORDS, TRUE_WORDS
from engine.model.embedded import EmbeddedModelError, import_embedded, is_embedded


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


def cuda_default(switch: bool | None) -> bool:
    """A speed switch that None leaves on CUDA only, and True or False force (the benches' comparisons)."""
    return on_cuda() if switch is None else switch


# What env_switch could not read, for each run to warn about (the modules read their switches once, at import,
# where the app's stderr is not on screen).
SWITCH_WARNINGS: list[str] = []


def env_switch(name: str) -> bool | None:
    """A speed switch from the environment: 1/true/on/yes forces it on, 0/false/off/no off; unset leaves it None,
    the default that cuda_default reads as "on CUDA only". Any other word also leaves the default, but says so
    (SWITCH_WARNINGS): a misspelt switch must not look like a measured setting."""
    value = os.environ.get(name, "").strip().lower()
    if value and value not in TRUE_WORDS + FALSE_WORDS:
        SWITCH_WARNINGS.append(f"{name}={value!r} is neither on (1, true, on, yes) nor off (0, false, off, no): "
                               "it is left at its default")
    return True if value in TRUE_WORDS else False if value in FALSE_WORDS else None


def expand_path(raw: str, field: str) -> Path:
    """`raw` with ~ expanded; a `~name` this machine has no user for is the user's mistake, not a crash."""
    try:
        return Path(raw).expanduser()
    except RuntimeError:  # Path.expanduser: "Could not determine home directory."
        user = raw[1:].split("/", 1)[0]
        who = f"no user {user!r} on this machine" if user else "no home directory (HOME is not set)"
        raise ModelLoadError(f"{field}: {raw!r}: cannot expand ~ ({who}); write the full path") from None


def resolve_model_path(cfg: ModelConfig, progress: Callable[[str, float], None] | None = None) -> Path:
    """The local directory holding the model: imported, found on disk, or fetched from the hub."""
    name = cfg.name.strip()
    if is_embedded(name):
        from engine.model.embedded import cache_root
        root = cache_root() if os.environ.get("LORA_TUI_CACHE") else expand_path(cfg.cache_dir, "model.cache_dir")
        try:
            return import_embedded(progress, root=root)
        except EmbeddedModelError as exc:
            raise ModelLoadError(str(exc)) from None
        except OSError as exc:  # an unwritable or full cache folder
            raise ModelLoadError(f"model.cache_dir: cannot import the embedded model into {root} "
                                 f"({exc.strerror or exc}); set model.cache_dir (or LORA_TUI_CACHE) to a "
                                 "writable folder") from None
    local = expand_path(name, "model.name")
    if local.exists() or name.startswith((".", "/", "~")):
        if not local.exists():
            raise ModelLoadError(f"model.name: {local} does not exist; name a model folder (config.json and "
                                 "*.safetensors), `embedded`, or a hub id like org/model")
        if not local.is_dir():
            raise ModelLoadError(f"model.name: {local} is a file, not a model folder")
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json")


def damaged_file(path: Path) -> str | None:
    """The first file of a model folder that cannot be what it claims (bad JSON, a cut safetensors file, no
    tokenizer), in words; None when each looks whole. Cheap: safetensors are opened lazily (headers only)."""
    import mlx.core as mx
    for name in JSON_FILES:
        f = path / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
                return f"{f}: not valid JSON ({_first_line(exc)})"
            if not isinstance(data, dict):
                return f"{f}: not a JSON object (it holds {type(data).__name__})"
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
    if not any((path / n).is_file() for n in tokenizer_files) and not any(path.glob("*.tiktoken")):
        return f"{path}: no tokenizer (none of {', '.join(tokenizer_files)})"
    for f in sorted(path.glob("*.safetensors")):
        try:
            mx.load(str(f))
        except (RuntimeError, OSError, ValueError) as exc:
            return f"{f}: not a complete safetensors file ({_first_line(exc)})"
    return None


def _redo_hint(path: Path) -> str:
    from engine.model.embedded import DIR_NAME
    return f"delete {path} and it is imported again" if path.name == DIR_NAME else "download or copy it again"


def check_folder(path: Path) -> None:
    """Refuse a damaged model folder before a long weight load, naming the file."""
    problem = damaged_file(path)
    if problem:
        raise ModelLoadError(f"model.name: {problem}: the model folder is damaged; {_redo_hint(path)}")


def load_failure(path: Path, exc: BaseException, what: str = "model") -> ModelLoadError:
    """Why mlx-lm could not load a folder whose files each look whole (an unknown model type, say)."""
    return ModelLoadError(f"model.name: {path}: the {what} cannot be loaded ({type(exc).__name__}: "
                          f"{_first_line(exc)})")


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
    check_folder(path)
    try:
        model, tokenizer, config = load(str(path), return_config=True,
                                        trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # whatever mlx-lm or transformers raise on this folder: it cannot be loaded
        raise load_failure(path, exc) from None
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


def cpu_training_warnings(info: LoadedModelInfo) -> list[str]:
    """What makes training on this CPU far slower than its defaults (float32, a dequantized base): both are the
    user's explicit choice, fair where the float32 model does not fit in memory, so a warning, not an error.
    One step of the embedded model (2 x 64 tokens, MKL, third step): 0.40 s; bfloat16 7.0 s; 4-bit kept 13.5 s;
    both 108 s (its first step: no second one was waited for)."""
    if on_gpu():
        return []
    slow = ([f"model.dtype is {info.dtype}"] if info.dtype != "float32" else []) + \
        (["model.quantized_base keeps the quantized base"] if info.quantized else [])
    if not slow:
        return []
    return [f"{' and '.join(slow)}: on the CPU, MLX trains many times slower this way than in float32 on a "
            "dequantized base (one step of the embedded model: 17x for bfloat16, 34x for a 4-bit base, 270x for "
            "both); set model.dtype and model.quantized_base to auto unless the float32 model does not fit in memory"]


def load_tokenizer(cfg: ModelConfig, progress=None):
    """Only the tokenizer (fast: used for dataset validation without loading weights)."""
    from mlx_lm.utils import load_tokenizer as _load_tokenizer
    path = resolve_model_path(cfg, progress)
    check_folder(path)
    eos = None
    try:
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        pass
    try:
        return _load_tokenizer(path, eos_token_ids=eos)
    except Exception as exc:  # as in load_model: a damaged or foreign tokenizer is the folder's problem
        raise load_failure(path, exc, "tokenizer") from None
