"""PEFT export/import (engine/export/peft.py) on real MLX models: names, shapes and config values of the export, the
q/k output-row permutation for the embedded (GGUF-layout) model and none for an HF-layout one, a round trip that gives
the same logits, continued training from an imported adapter, and one-line refusals that leave nothing behind.
(bench/check_peft.py compares with Hugging Face PEFT itself.)"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from engine.config.schema import Config
from engine.export.errors import ExportError
from engine.export.peft import export_peft, import_peft
from engine.model.adapters import adapter_weights, apply_lora, load_with_adapter, save_adapters
from engine.model.loading import load_model
from engine.train.run import TrainingRun
from helpers import tiny_config

PROMPT = [1, 42, 7, 200, 12, 99, 5]  # token ids below the tiny Mistral's vocabulary size (261)
TARGETS = ["q_proj", "k_proj", "v_proj"]


def config(name: str, use_dora: bool = False) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.dtype = name, "float32"
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 12.0, 0.0
    cfg.lora.target_modules, cfg.lora.num_layers, cfg.lora.use_dora = TARGETS, 2, use_dora
    return cfg


def make_adapter(cfg: Config, folder):
    """An adapter with random non-zero B (and DoRA magnitudes off the base's norms), saved; its logits."""
    model, _, _ = load_model(cfg.model)
    mx.random.seed(3)
    acfg = apply_lora(model, cfg.lora, lean=False)
    moved = {k: mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else
             v * (1 + 0.1 * mx.random.normal(v.shape)) if k.endswith(".m") else v
             for k, v in adapter_weights(model).items()}
    model.load_weights(list(moved.items()), strict=False)
    save_adapters(model, acfg, folder)
    return {k: np.array(v) for k, v in moved.items()}, np.array(model(mx.array(PROMPT)[None]))


def logits_with(cfg: Config, adapter) -> np.ndarray:
    model, _, _ = load_with_adapter(cfg, adapter)
    return np.array(model(mx.array(PROMPT)[None]))


def to_hf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rows -> HF's rotate-half rows, written out independently of the code under test."""
    d = w.shape[0] // heads
    order = [h * d + 2 * k + j for h in range(heads) for j in (0, 1) for k in range(d // 2)]
    return w[order]


def peft_tensors(folder) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_embedded_round_trip_permutes_q_and_k(use_dora, tmp_path, embedded_dir):
    cfg = config("embedded", use_dora)
    ours, logits = make_adapter(cfg, tmp_path / "adapter")
    result = export_peft(cfg, tmp_path / "adapter", tmp_path / "peft")
    assert result["format"] == "peft" and result["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    pcfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pcfg["peft_type"] == "LORA" and pcfg["task_type"] == "CAUSAL_LM" and pcfg["r"] == 4
    assert pcfg["lora_alpha"] == 12 and pcfg["lora_dropout"] == 0.0 and pcfg["use_dora"] is use_dora
    assert pcfg["target_modules"] == ["k_proj", "q_proj", "v_proj"] and pcfg["layers_to_transform"] == [28, 29]
    assert pcfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (pcfg["bias"], pcfg["use_rslora"], pcfg["fan_in_fan_out"]) == ("none", False, False)

    theirs = peft_tensors(tmp_path / "peft")
    assert len(theirs) == 2 * 3 * (3 if use_dora else 2)
    heads = {"q_proj": 9, "k_proj": 3, "v_proj": None}  # SmolLM2-135M: 9 query heads, 3 key/value heads of 64
    for short, out_dims in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192)):
        ours_name = f"model.layers.29.self_attn.{short}"
        name = f"base_model.model.{ours_name}"
        assert theirs[f"{name}.lora_A.weight"].shape == (4, 576) and theirs[f"{name}.lora_A.weight"].dtype == np.float32
        np.testing.assert_array_equal(theirs[f"{name}.lora_A.weight"], ours[f"{ours_name}.lora_a"].T)
        rows = (lambda w: to_hf_rows(w, heads[short])) if heads[short] else (lambda w: w)
        assert theirs[f"{name}.lora_B.weight"].shape == (out_dims, 4)
        np.testing.assert_array_equal(theirs[f"{name}.lora_B.weight"], rows(ours[f"{ours_name}.lora_b"].T))
        if use_dora:
            np.testing.assert_array_equal(theirs[f"{name}.lora_magnitude_vector"], rows(ours[f"{ours_name}.m"]))

    back = import_peft(cfg, tmp_path / "peft", tmp_path / "back")
    assert (back["fine_tune_type"], back["rank"], back["scale"], back["padded_modules"]) == (
        "dora" if use_dora else "lora", 4, 3.0, 0)
    acfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert acfg["num_layers"] == 2 and acfg["lora_parameters"]["keys"] == [f"self_attn.{t}" for t in sorted(TARGETS)]
    again = logits_with(cfg, tmp_path / "back")
    np.testing.assert_allclose(again, logits, rtol=0, atol=1e-6)


def test_hf_layout_base_keeps_rows_and_round_trips(tmp_path, mistral_dir):
    cfg = config(str(mistral_dir), use_dora=True)
    cfg.lora.num_layers = -1
    ours, logits = make_adapter(cfg, tmp_path / "adapter")
    export_peft(cfg, tmp_path / "adapter", tmp_path / "peft")
    pcfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pcfg["layers_to_transform"] is None and pcfg["base_model_name_or_path"] == str(mistral_dir)
    theirs = peft_tensors(tmp_path / "peft")
    for short in TARGETS:  # no rope_traditional: B and the magnitude keep their row order
        name = f"model.layers.1.self_attn.{short}"
        np.testing.assert_array_equal(theirs[f"base_model.model.{name}.lora_B.weight"], ours[f"{name}.lora_b"].T)
        np.testing.assert_array_equal(theirs[f"base_model.model.{name}.lora_magnitude_vector"], ours[f"{name}.m"])
    import_peft(cfg, tmp_path / "peft", tmp_path / "back")
    np.testing.assert_allclose(logits_with(cfg, tmp_path / "back"), logits, rtol=0, atol=1e-6)


def test_rslora_scale_and_missing_modules_are_padded(tmp_path, mistral_dir):
    """use_rslora's scale is alpha / sqrt(r); a module PEFT left out gets a neutral (B = 0) adapter."""
    cfg = config(str(mistral_dir))
    cfg.lora.num_layers = -1
    _, logits = make_adapter(cfg, tmp_path / "adapter")
    export_peft(cfg, tmp_path / "adapter", tmp_path / "peft")
    tensors = {k: v for k, v in mx.load(str(tmp_path / "peft" / "adapter_model.safetensors")).items()
               if "layers.0.self_attn.v_proj" not in k}
    mx.save_safetensors(str(tmp_path / "peft" / "adapter_model.safetensors"), tensors)
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"use_rslora": True, "lora_alpha": 6}))
    result = import_peft(cfg, tmp_path / "peft", tmp_path / "back")
    assert result["scale"] == 3.0 and result["padded_modules"] == 1  # 6 / sqrt(4)
    saved = mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert not saved["model.layers.0.self_attn.v_proj.lora_b"].any().item()
    assert np.abs(logits_with(cfg, tmp_path / "back") - logits).max() > 1e-3  # v_proj of layer 0 is gone


def test_trained_adapter_exported_imported_and_trained_on(tmp_path, embedded_dir):
    """A real run's folder exports; its re-import starts a continued run at the very loss the original gives."""
    lora = {"target_modules": TARGETS, "use_dora": True, "num_layers": 2}
    quick = {"every_steps": 0}
    (tmp_path / "a").mkdir()
    first = TrainingRun(tiny_config(tmp_path / "a", lora=lora, training={"iterations": 2},
                                    evaluation=quick, checkpoints=quick)).run()
    assert first.status == "finished", first.message
    cfg = tiny_config(tmp_path / "a", lora=lora)
    export_peft(cfg, first.run_dir, tmp_path / "peft")
    import_peft(cfg, tmp_path / "peft", tmp_path / "back")
    losses = []
    for name, start in (("b", first.run_dir / "adapter"), ("c", tmp_path / "back")):
        run = TrainingRun(tiny_config(tmp_path / name, lora=lora, data={"path": str(tmp_path / "a" / "tiny.jsonl")},
                                      training={"iterations": 1, "init_adapter": str(start)},
                                      evaluation=quick, checkpoints=quick)).run()
        assert run.status == "finished", run.message
        losses.append(run.losses[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=0)


# ------------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def mistral_peft(tmp_path_factory, mistral_dir):
    """A PEFT export of a LoRA on the tiny Mistral (2 layers, hidden 64), to be copied and spoiled."""
    folder = tmp_path_factory.mktemp("mistral-peft")
    cfg = config(str(mistral_dir))
    make_adapter(cfg, folder / "adapter")
    export_peft(cfg, folder / "adapter", folder / "peft")
    return folder


def spoiled(tmp_path, mistral_peft, **changes):
    folder = tmp_path / "spoiled"
    shutil.copytree(mistral_peft / "peft", folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return folder


def refused(call, *args) -> str:
    with pytest.raises(ExportError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_another_base_is_refused_naming_the_tensor_and_shapes(tmp_path, mistral_peft, embedded_dir):
    message = refused(import_peft, config("embedded"), mistral_peft / "peft", tmp_path / "out")
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight is (4, 64)" in message
    assert "needs (4, 576)" in message and "another base model" in message
    message = refused(export_peft, config("embedded"), mistral_peft / "adapter", tmp_path / "out")
    assert "does not fit" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, words", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"alpha_pattern": {"q_proj": 64}}, "rank_pattern/alpha_pattern"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"use_dora": True}, "needs lora_A.weight, lora_B.weight, lora_magnitude_vector"),
])
def test_what_we_cannot_represent_is_refused(changes, words, tmp_path, mistral_peft, mistral_dir):
    folder = spoiled(tmp_path, mistral_peft, **changes)
    assert words in refused(import_peft, config(str(mistral_dir)), folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_embedding_lora_pickles_and_a_full_out_are_refused(tmp_path, mistral_peft, mistral_dir):
    cfg = config(str(mistral_dir))
    folder = spoiled(tmp_path, mistral_peft)
    tensors = dict(mx.load(str(folder / "adapter_model.safetensors")))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = mx.zeros((4, 10))
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors)
    assert "embedding" in refused(import_peft, cfg, folder, tmp_path / "out")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    assert "pickle" in refused(import_peft, cfg, folder, tmp_path / "out")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "not empty" in refused(import_peft, cfg, mistral_peft / "peft", full)
    assert "not empty" in refused(export_peft, cfg, mistral_peft / "adapter", full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"] and not (tmp_path / "out").exists()
