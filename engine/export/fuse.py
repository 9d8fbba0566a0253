"""Fuse an adapter into its base model: a directory `mlx_lm.load` opens, checked against base + adapter."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from engine import atomic
from engine.config.schema import Config


class FuseError(RuntimeError):
    """The adapter cannot be loaded or fused (exit code 4)."""


class FuseTargetError(FuseError):
    """`--out` cannot take the fused model: it exists, or the place is not writable (exit code 2)."""


class FuseCheckError(FuseError):
    """Fusing gave a wrong model, e.g. non-finite weights; nothing was written (exit code 5)."""


def check_out(out: str | Path) -> Path:
    """The absolute `--out` folder, refused before any work when it could not take the fused model: an
    existing file or non-empty folder (never replaced), or a place that cannot be written."""
    try:
        path = Path(out).expanduser().absolute()
    except RuntimeError:
        raise FuseTargetError(f"--out {out}: cannot expand ~ (no such user here); write the full path") from None
    if path.is_symlink():  # the fused folder would replace the link, not fill what it points at
        raise FuseTargetError(f"--out {path}: is a symbolic link; name a new folder for the fused model")
    if path.exists() and not path.is_dir():
        raise FuseTargetError(f"--out {path}: exists and is not a folder; name a new folder for the fused model")
    try:
        if path.is_dir() and any(path.iterdir()):
            raise FuseTargetError(f"--out {path}: exists and is not empty; name a new folder (nothing was changed)")
    except OSError as exc:
        raise FuseTargetError(f"--out {path}: cannot be read ({exc.strerror}); name a new folder") from None
    parent = path.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise FuseTargetError(f"--out {path}: {parent} is a file, so no folder can be made inside it")
    try:  # the only sure test of writability (root passes os.access on a read-only mount)
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise FuseTargetError(f"--out {path}: cannot write in {parent} ({exc.strerror}); choose a writable "
                              "place") from None
    return path


def _non_finite_params(model) -> list[str]:
    from mlx.utils import tree_flatten

    from engine.model.adapters import non_finite
    return non_finite(dict(tree_flatten(model.parameters())))


def _finite_logits(model, tokenizer, messages, reply_text: str) -> bool:
    """Whether the model's output over the check prompt and its reply is finite: two NaN models generate
    the same (meaningless) tokens, so equal replies prove nothing unless this holds."""
    import mlx.core as mx

    from engine.data.encode import ChatEncoder
    prompt = ChatEncoder(tokenizer).prompt_text(messages)
    ids = tokenizer.encode(prompt + reply_text, add_special_tokens=False)
    return bool(mx.all(mx.isfinite(model(mx.array(ids)[None]))).item())


def _require_finite(model, tokenizer, messages, reply_text: str, adapter) -> None:
    if not _finite_logits(model, tokenizer, messages, reply_text):
        raise FuseError(f"{adapter}: base + adapter give NaN or infinite outputs on the check prompt: the "
                        "adapter is broken (e.g. an extreme scale); nothing was written")


def fuse(cfg: Config, adapter: str | Path, out: str | Path, check_prompt: str = "Hello! Who are you?") -> dict:
    """Write the fused model to `out` (atomically) and check it generates what base + adapter generates."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load as mlx_load
    from mlx_lm.utils import save

    from engine.generate.reply import GenerationSettings, reply
    from engine.model.adapters import load_with_adapter
    from engine.model.loading import resolve_model_path

    out = check_out(out)
    model, tokenizer, info = load_with_adapter(cfg, adapter)
    settings = GenerationSettings(max_tokens=32, temperature=0.0)
    messages = [{"role": "user", "content": check_prompt}]
    _require_finite(model, tokenizer, messages, "", adapter)  # the prompt alone first: fails before generating
    expected = reply(model, tokenizer, messages, settings)
    _require_finite(model, tokenizer, messages, expected, adapter)
    fused = [(n, m.fuse(dequantize=not info.quantized)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    bad = _non_finite_params(model)
    if bad:
        raise FuseCheckError(f"the fused model would hold NaN or infinite weights in {bad[0]} ({len(bad)} "
                             f"tensor(s)): the base or the adapter is broken, or {info.dtype} cannot hold the "
                             "merged values; nothing was written")
    src = resolve_model_path(cfg.model)
    config = json.loads((src / "config.json").read_text())
    if not info.quantized:  # we trained on dequantized weights: save them so, exactly
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    config["torch_dtype"] = info.dtype
    try:
        with atomic.folder(out) as tmp:  # `out` is absent or empty (checked above)
            save(tmp, src, model, tokenizer, config, donate_model=False)
    except (OSError, RuntimeError) as exc:  # mx.save_safetensors raises RuntimeError on a failed write
        raise FuseTargetError(f"--out {out}: could not write the fused model ({exc}); nothing was left "
                              "there") from None
    del model
    mx.clear_cache()
    fused_model, fused_tok = mlx_load(str(out))
    got = reply(fused_model, fused_tok, messages, settings)
    finite = _finite_logits(fused_model, fused_tok, messages, got)
    return {"path": str(out), "check_prompt": check_prompt, "adapter_reply": expected, "fused_reply": got,
            "finite_output": finite, "same_greedy_output": finite and got == expected}
