"""Model resolution: a local Mistral-architecture directory, bad paths, a hub id with no network."""

import pytest

from engine.config.schema import ModelConfig
from engine.model.loading import ModelLoadError, load_model, resolve_model_path


def test_local_mistral_directory_loads_and_formats_inst(mistral_dir):
    model, tok, info = load_model(ModelConfig(name=str(mistral_dir)))
    assert info.model_type == "mistral" and info.dtype == "float32"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                   tokenize=False)
    assert text == "<s>[INST] Hi[/INST] Yo</s>"
    import mlx.core as mx
    logits = model(mx.array([tok.encode("[INST] Hi[/INST]", add_special_tokens=False)]))
    assert logits.shape[-1] == info_vocab(mistral_dir)


def info_vocab(path):
    import json
    return json.loads((path / "config.json").read_text())["vocab_size"]


def test_bfloat16_cast_keeps_model_usable(mistral_dir):
    import mlx.core as mx
    model, tok, info = load_model(ModelConfig(name=str(mistral_dir), dtype="bfloat16"))
    assert info.dtype == "bfloat16"
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16


def test_embedded_can_stay_quantized(embedded_dir):
    model, _, info = load_model(ModelConfig(name="embedded", quantized_base="keep"))
    assert info.quantized
    import mlx.nn as nn
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


@pytest.mark.parametrize("name,needle", [
    ("./no/such/dir", "does not exist"),
    ("not a model", "neither `embedded`, an existing directory, nor a hub id"),
])
def test_bad_model_names(name, needle):
    with pytest.raises(ModelLoadError, match=needle):
        resolve_model_path(ModelConfig(name=name))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        resolve_model_path(ModelConfig(name=str(tmp_path)))


def test_hub_id_without_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot fetch 'mlx-community/Mistral-7B-Instruct-v0.3-4bit'"):
        resolve_model_path(ModelConfig(name="mlx-community/Mistral-7B-Instruct-v0.3-4bit"))
