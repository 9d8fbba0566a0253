"""Adapters both ways between our format (mlx-lm's) and Hugging Face PEFT's LoRA/DoRA format.

The maths is the same (y = W x + scale * B A x; DoRA rescales each output row to a learned magnitude); the names,
the orientation (mlx-lm's A is (in, r) and B (r, out), PEFT's (r, in) and (out, r)) and the scaling's spelling (our
scale = PEFT's lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) differ.

One catch: a base imported from a GGUF file (the embedded model) keeps llama.cpp's interleaved rotary layout of the
q_proj/k_proj rows (its config says rope_traditional), while a Hugging Face checkpoint of the same model uses the
rotate-half layout. The output rows of a q/k update (B's rows, DoRA's magnitude) are permuted on the way out and
back on the way in, as llama.cpp's convert_hf_to_gguf permutes the weights themselves.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from engine import atomic
from engine.config.schema import Config
from engine.export.errors import ExportError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps LoraModel wraps the transformers model
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantized from
OURS = re.compile(r"^(?P<pre>(?:.*\.)?)layers\.(?P<i>\d+)\.(?P<key>.+)\.(?P<leaf>lora_a|lora_b|m)$")
THEIRS = re.compile(r"^(?:base_model\.model\.)?(?P<pre>(?:.*\.)?)layers\.(?P<i>\d+)\.(?P<key>.+)\."
                    r"(?P<leaf>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
LEAVES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}

# PEFT options whose adapters mlx-lm's LoRA/DoRA layers cannot reproduce: (key, is it in use?, what to do).
_VARIANT = "a LoRA variant mlx-lm does not have; retrain as plain LoRA or DoRA"
UNSUPPORTED = (
    ("bias", lambda v: v not in (None, "none"), "bias terms were trained too; retrain with bias='none'"),
    ("lora_bias", bool, "lora_B has a bias; retrain with lora_bias=False"),
    ("modules_to_save", bool, "whole modules (e.g. lm_head) were trained too; retrain without modules_to_save"),
    ("trainable_token_indices", bool, "token embeddings were trained too; retrain without trainable_token_indices"),
    ("target_parameters", bool, "LoRA on bare parameters (MoE experts) is not supported; target Linear layers"),
    ("layer_replication", bool, "the base's layers were replicated; retrain without layer_replication"),
    ("fan_in_fan_out", bool, "made for Conv1D (GPT-2 style) weights; retrain on a model with Linear layers"),
    ("megatron_config", bool, "Megatron parallel layers are not supported; retrain without megatron_config"),
    ("use_qalora", bool, _VARIANT), ("alora_invocation_tokens", bool, _VARIANT), ("velora_config", bool, _VARIANT),
    ("monteclora_config", bool, _VARIANT), ("use_bdlora", bool, _VARIANT), ("arrow_config", bool, _VARIANT),
    ("kasa_config", bool, _VARIANT),
)
# Initialisations that also change the base weights: the adapter alone is not the whole model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# ------------------------------------------------------------------------------------------------- shared

def _check_out(out) -> Path:
    from engine.export.fuse import FuseTargetError, check_out
    try:
        return check_out(out)
    except FuseTargetError as exc:
        raise ExportError(str(exc).replace("the fused model", "the adapter")) from None


def _base(cfg: Config):
    """The configured base, loaded lazily (no weight is read unless used): its modules, shapes and config."""
    from mlx_lm.utils import load_model as mlx_load_model

    from engine.model.loading import ModelLoadError, check_folder, load_failure, resolve_model_path
    try:
        path = resolve_model_path(cfg.model)
        check_folder(path)
        try:
            return mlx_load_model(path, lazy=True, trust_remote_code=cfg.model.trust_remote_code)
        except Exception as exc:  # whatever mlx-lm raises on this folder, as load_model says it
            raise load_failure(path, exc) from None
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None


def _rotary_heads(config: dict) -> dict[str, int]:
    """Head counts of the modules whose output rows are in llama.cpp's interleaved order, by short name: only
    where the base says rope_traditional (a GGUF or Meta-layout import); a Hugging Face layout needs none."""
    if not config.get("rope_traditional"):
        return {}
    heads = int(config["num_attention_heads"])
    return {"q_proj": heads, "k_proj": int(config.get("num_key_value_heads") or heads)}


def _permute_rows(w, heads: int, to_hf: bool):
    """Output rows from llama.cpp's interleaved order to HF's rotate-half one (to_hf), or back: the latter is
    convert_hf_to_gguf's permute(w, n_head), the former its inverse."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, *((half, 2) if to_hf else (2, half)), *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _written(folder: Path, **extra) -> dict:
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {"path": str(folder), "bytes": sum((folder / f).stat().st_size for f in files), "files": files} | extra


def _write(out: Path, weights_file: str, tensors: dict, config: dict, **metadata) -> None:
    """Both files into a temp folder renamed to `out` (absent or empty, checked first): nothing partial is left."""
    import mlx.core as mx
    try:
        with atomic.folder(out) as tmp:
            mx.save_safetensors(str(tmp / weights_file), tensors, metadata=metadata or None)
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    except (OSError, RuntimeError) as exc:  # mx.save_safetensors raises RuntimeError on a failed write
        raise ExportError(f"--out {out}: could not write the adapter ({exc}); nothing was left there") from None


# ------------------------------------------------------------------------------------------------- export

def _peft_config(cfg: Config, acfg: dict, layers: list[int], n_layers: int, targets: list[str]) -> dict:
    params = acfg["lora_parameters"]
    r, scale = params["rank"], params["scale"]
    alpha = acfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or alpha / r != scale:  # ours is for humans: scale is the truth
        alpha = scale * r
    alpha = int(alpha) if float(alpha).is_integer() else alpha  # PEFT documents lora_alpha as an int
    from engine.model.embedded import is_embedded
    partial = len(layers) < n_layers
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": params["dropout"], "target_modules": targets,
        "layers_to_transform": layers if partial else None, "layers_pattern": "layers" if partial else None,
        "use_dora": acfg.get("fine_tune_type") == "dora", "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": EMBEDDED_HUB_ID if is_embedded(cfg.model.name) else cfg.model.name,
    }


def _peft_tensors(weights: dict, heads: dict[str, int]) -> tuple[dict, set[int], set[str]]:
    """Our tensors under PEFT's names and orientation, q/k output rows in Hugging Face's order."""
    import mlx.core as mx
    out, layers, targets = {}, set(), set()
    for name, w in weights.items():
        match = OURS.match(name)
        if not match or (match["leaf"] != "m" and w.ndim != 2):
            raise ExportError(f"{name}: not a LoRA/DoRA tensor of a Linear layer; only those can be exported")
        module, leaf = name.rsplit(".", 1)
        short = module.rsplit(".", 1)[-1]
        w = w if leaf == "m" else w.T  # (in, r) -> (r, in) and (r, out) -> (out, r)
        if leaf != "lora_a" and short in heads:
            w = _permute_rows(w, heads[short], to_hf=True)
        out[PREFIX + module + "." + LEAVES[leaf]] = mx.contiguous(w)
        layers.add(int(match["i"]))
        targets.add(short)
    return out, layers, targets


def export_peft(cfg: Config, adapter: str | Path, out: str | Path, progress=None) -> dict:
    """Write our adapter (an adapter, checkpoint or run folder) as a PEFT folder `out` that
    PeftModel.from_pretrained(base, out) loads on the Hugging Face checkpoint of the configured base."""
    from engine.model.adapters import AdapterError, adapter_folder, apply_saved_adapter, read_saved_adapter
    report, out = progress or (lambda what, frac: None), _check_out(out)
    report("reading the adapter", 0.05)
    try:
        folder = adapter_folder(adapter)
        saved = read_saved_adapter(folder)
        report("checking it against the base", 0.2)
        model, config = _base(cfg)
        apply_saved_adapter(model, folder, saved, f"the base model {cfg.model.name}")  # lazy: shapes only
    except AdapterError as exc:
        raise ExportError(str(exc)) from None
    acfg, weights = saved
    tensors, layers, targets = _peft_tensors(weights, _rotary_heads(config))
    pcfg = _peft_config(cfg, acfg, sorted(layers), len(model.layers), sorted(targets))
    report("writing the PEFT adapter", 0.6)
    _write(out, PEFT_WEIGHTS, tensors, pcfg, format="pt")  # transformers' loaders expect format "pt"
    report("PEFT adapter written", 1.0)
    return _written(out, format="peft")


# ------------------------------------------------------------------------------------------------- import

def _peft_folder(peft_dir) -> Path:
    try:
        folder = Path(peft_dir).expanduser()
    except RuntimeError:  # `~name` for a user this machine does not have
        raise ExportError(f"{peft_dir}: cannot expand ~ (no such user here); write the full path") from None
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder; name a PEFT adapter folder ({PEFT_CONFIG} + {PEFT_WEIGHTS})")
    if not (folder / PEFT_WEIGHTS).is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        why = ("holds only adapter_model.bin, a pickle, which is never loaded: save it again with "
               "save_pretrained(..., safe_serialization=True)" if pickled else f"has no {PEFT_WEIGHTS}")
        raise ExportError(f"{folder}: {why}")
    return folder


def _read_peft_config(folder: Path) -> dict:
    path = folder / PEFT_CONFIG
    try:
        pcfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: missing or not valid JSON ({exc}); it is not a PEFT adapter folder") from None
    if not isinstance(pcfg, dict) or pcfg.get("peft_type") != "LORA":
        kind = pcfg.get("peft_type") if isinstance(pcfg, dict) else None
        raise ExportError(f"{path}: peft_type {kind!r}: only LORA adapters (plain or DoRA) can be imported")
    for key, used, todo in UNSUPPORTED:
        if used(pcfg.get(key)):
            raise ExportError(f"{path}: {key} = {pcfg[key]!r} cannot be imported: {todo}")
    init = pcfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ExportError(f"{path}: init_lora_weights = {init!r} also changed the base weights: save it with PEFT's "
                          "path_initial_model_for_weight_conversion to get a plain LoRA, and import that")
    if not isinstance(pcfg.get("r"), int) or not isinstance(pcfg.get("lora_alpha"), (int, float)):
        raise ExportError(f"{path}: r and lora_alpha must be numbers (got {pcfg.get('r')!r}, "
                          f"{pcfg.get('lora_alpha')!r})")
    dropout = pcfg.get("lora_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ExportError(f"{path}: lora_dropout {dropout!r} is not in [0, 1)")
    return pcfg


def _group(weights: dict, path: Path) -> tuple[dict, str]:
    """PEFT tensors by (layer, module key inside the block): {leaf: tensor}; refuses any other tensor."""
    modules, prefixes = {}, set()
    for name, w in sorted(weights.items()):
        match = THEIRS.match(name)
        if not match:
            what = ("a LoRA on an embedding or the output head" if re.search(r"lora_embedding|embed|lm_head", name)
                    else "not a LoRA tensor of a transformer block's Linear layer")
            raise ExportError(f"{path}: {name} is {what}; only block Linear layers can be imported: retrain "
                              "without it in target_modules")
        prefixes.add(match["pre"])
        modules.setdefault((int(match["i"]), match["key"]), {})[match["leaf"]] = w
    if len(prefixes) != 1:
        raise ExportError(f"{path}: " + (f"LoRA tensors in several stacks of layers ({', '.join(sorted(prefixes))})"
                                         if prefixes else "holds no LoRA tensors"))
    return modules, prefixes.pop()


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _rank_and_scale(pcfg: dict, modules: dict, prefix: str, path: Path) -> tuple[int, float]:
    """The one (rank, scale) of every module: mlx-lm's adapter config has a single pair."""
    seen, need = {}, {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if pcfg.get("use_dora") else set())
    for (i, key), leaves in modules.items():
        name = f"{prefix}layers.{i}.{key}"
        r = _pattern(pcfg.get("rank_pattern"), name, pcfg["r"])
        alpha = _pattern(pcfg.get("alpha_pattern"), name, pcfg["lora_alpha"])
        if set(leaves) != need:
            raise ExportError(f"{path}: {name} has {', '.join(sorted(leaves))} where use_dora = "
                              f"{bool(pcfg.get('use_dora'))} needs {', '.join(sorted(need))}; the adapter is damaged")
        if leaves["lora_A.weight"].shape[0] != r:
            raise ExportError(f"{path}: {name}.lora_A.weight has rank {leaves['lora_A.weight'].shape[0]} where "
                              f"{PEFT_CONFIG} says r = {r}; the adapter is damaged")
        seen[(r, alpha / math.sqrt(r) if pcfg.get("use_rslora") else alpha / r)] = name
    if len(seen) > 1:
        (pair_a, one), (pair_b, two) = list(seen.items())[:2]
        raise ExportError(f"{path}: {one} has rank/scale {pair_a} but {two} {pair_b} (rank_pattern/alpha_pattern): "
                          "our adapters have one rank and one scale for all modules; retrain without the patterns")
    return next(iter(seen))


def _linear_dims(module) -> tuple[int, int] | None:
    """(out, in) of a Linear or QuantizedLinear; None for any other module."""
    import mlx.nn as nn
    if isinstance(module, nn.QuantizedLinear):
        return module.weight.shape[0], module.weight.shape[1] * 32 // module.bits
    return tuple(module.weight.shape) if isinstance(module, nn.Linear) else None


def _check_fits(model, modules: dict, prefix: str, path: Path, base: str) -> None:
    """Every PEFT tensor has a Linear layer of the base with its shape; one line on the first that has not."""
    for (i, key), leaves in sorted(modules.items()):
        name = f"{prefix}layers.{i}.{key}"
        layer = model.layers[i] if i < len(model.layers) else None
        dims = _linear_dims(dict(layer.named_modules()).get(key)) if layer is not None else None
        if dims is None:
            raise ExportError(f"{path}: {name} is not a Linear layer of {base} ({len(model.layers)} layers): the "
                              "adapter was made for another base model; set model.name to its base")
        r = leaves["lora_A.weight"].shape[0]
        need = {"lora_A.weight": (r, dims[1]), "lora_B.weight": (dims[0], r), "lora_magnitude_vector": (dims[0],)}
        for leaf, w in leaves.items():
            if tuple(w.shape) != need[leaf]:
                raise ExportError(f"{path}: {PREFIX}{name}.{leaf} is {tuple(w.shape)} but {base} needs "
                                  f"{need[leaf]}: the adapter was made for another base model; set model.name to "
                                  "its base")


def _our_tensors(model, modules: dict, heads: dict[str, int]) -> tuple[dict, int]:
    """The adapter tensors of `model` (its fresh adapter layers applied) filled from PEFT's, in float32; a module
    PEFT left out (our adapters cover whole blocks) keeps its fresh, exactly neutral, B = 0 adapter."""
    import mlx.core as mx

    from engine.model.adapters import adapter_weights
    ours, padded = {}, set()
    for name, fresh in adapter_weights(model).items():
        match = OURS.match(name)
        leaves = modules.get((int(match["i"]), match["key"]))
        if leaves is None:
            padded.add(name.rsplit(".", 1)[0])
            ours[name] = fresh.astype(mx.float32)
            continue
        w = leaves[LEAVES[match["leaf"]]].astype(mx.float32)
        short = match["key"].rsplit(".", 1)[-1]
        if match["leaf"] != "lora_a" and short in heads:
            w = _permute_rows(w, heads[short], to_hf=False)
        ours[name] = mx.contiguous(w if match["leaf"] == "m" else w.T)
    return ours, len(padded)


def import_peft(cfg: Config, peft_dir: str | Path, out: str | Path, progress=None) -> dict:
    """Write a PEFT LoRA/DoRA adapter (PEFT, TRL, Unsloth...) as our adapter folder `out`, checked against the
    configured base: load_with_adapter(cfg, out) and training.init_adapter use it as one of our own."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from engine.model.adapters import AdapterError, non_finite, read_adapter_weights
    report, out = progress or (lambda what, frac: None), _check_out(out)
    src = _peft_folder(peft_dir)
    report("reading the PEFT adapter", 0.05)
    pcfg = _read_peft_config(src)
    path = src / PEFT_WEIGHTS
    try:
        weights = read_adapter_weights(path)
    except AdapterError as exc:
        raise ExportError(str(exc)) from None
    bad = non_finite(weights)
    if bad:
        raise ExportError(f"{path}: {bad[0]} holds NaN or infinite values; the adapter is broken")
    modules, prefix = _group(weights, path)
    rank, scale = _rank_and_scale(pcfg, modules, prefix, path)
    dora = bool(pcfg.get("use_dora"))
    report("checking it against the base", 0.2)
    model, config = _base(cfg)
    _check_fits(model, modules, prefix, path, f"the base model {cfg.model.name}")
    first = min(i for i, _ in modules)  # our adapters cover the last blocks, from the first PEFT adapted
    acfg = {"fine_tune_type": "dora" if dora else "lora", "num_layers": len(model.layers) - first,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(pcfg.get("lora_dropout") or 0.0),
                                "keys": sorted({key for _, key in modules})},
            "lora_alpha": scale * rank}
    model.freeze()
    linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"], use_dora=dora)
    tensors, padded = _our_tensors(model, modules, _rotary_heads(config))
    mx.eval(list(tensors.values()))
    report("writing the adapter", 0.7)
    _write(out, "adapters.safetensors", tensors, acfg)
    report("adapter written", 1.0)
    return _written(out, format="mlx", fine_tune_type=acfg["fine_tune_type"], rank=rank, scale=scale,
                    padded_modules=padded)
