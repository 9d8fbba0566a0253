"""GGUF export, read back with llama.cpp's own `gguf` package: every tensor and key there, each weight equal to
base + adapter fused (in llama.cpp's q/k layout: kept for the embedded model, permuted for a Hugging Face
one), quantized types that dequantize to it, and the refusals: an unknown architecture, --out taken, a full
disk mid-write (no file, no temp file left), an adapter for another base. transformers' and llama.cpp's own
loaders are checked by bench/check_gguf.py (too heavy for CI)."""

import errno
import json
import shutil

import gguf
import mlx.core as mx
import numpy as np
import pytest

from engine.config.schema import Config
from engine.export.errors import ExportError, ExportUsageError
from engine.export.gguf import export_gguf, permute_for_gguf
from engine.model.adapters import AdapterError, apply_lora, save_adapters
from engine.model.loading import load_model
from helpers import lora_tui

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def random_adapter(cfg: Config, folder, seed: int = 0):
    """An adapter whose lora_b is not zero (a fresh one changes nothing), saved in our format; returns it and
    the model it was made on."""
    cfg.lora.target_modules, cfg.lora.num_layers = TARGETS, 2
    model, _, _ = load_model(cfg.model)
    acfg = apply_lora(model, cfg.lora, lean=False)
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    save_adapters(model, acfg, folder)
    return folder, model


def fused(model, path: str) -> np.ndarray:
    layer = model
    for part in path.split("."):
        layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    return np.asarray(layer.fuse(dequantize=True).weight.astype(mx.float32))


def tensors(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t, gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1]))
            for t in reader.tensors}


@pytest.fixture(scope="module")
def embedded_adapter(tmp_path_factory, embedded_dir):
    return random_adapter(Config(), tmp_path_factory.mktemp("adapter") / "adapter")


def test_embedded_model_f16_holds_every_tensor_key_and_the_fused_weights(embedded_adapter, tmp_path):
    folder, model = embedded_adapter
    result = export_gguf(Config(), folder, tmp_path / "m.gguf", "f16")
    assert result["tensors"] == 272 and not result["permuted_qk"]  # the embedded model keeps llama.cpp's layout
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 30
    assert fields["llama.attention.head_count_kv"] == 3 and fields["llama.rope.dimension_count"] == 64
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and len(fields["tokenizer.ggml.merges"]) == 48900
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and "<|im_start|>" in fields["tokenizer.chat_template"]
    got = tensors(tmp_path / "m.gguf")
    original = {t.name for t in gguf.GGUFReader(str(_embedded_gguf())).tensors}
    assert set(got) == original  # every tensor llama.cpp's own file had, by the same names
    t, q = got["blk.29.attn_q.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    assert got["blk.29.attn_norm.weight"][0].tensor_type == gguf.GGMLQuantizationType.F32
    want = fused(model, "model.layers.29.self_attn.q_proj")
    assert np.allclose(q, want, atol=2e-3, rtol=1e-3)
    base_q = np.asarray(model.model.layers[29].self_attn.q_proj.linear.weight.astype(mx.float32))
    assert np.abs(q - base_q).max() > 1e-2  # the file holds the adapter's change, not the base alone


def _embedded_gguf():
    from engine.model.embedded import gguf_path
    return gguf_path()


def test_q8_0_dequantizes_to_the_fused_weights_in_half_the_space(embedded_adapter, tmp_path):
    folder, model = embedded_adapter
    result = export_gguf(Config(), folder, tmp_path / "q.gguf", "q8_0")
    t, q = tensors(tmp_path / "q.gguf")["blk.28.attn_v.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = fused(model, "model.layers.28.self_attn.v_proj")
    assert np.abs(q - want).max() < 0.01 * np.abs(want).max()
    assert result["bytes"] < 0.6 * 270e6


def test_a_hugging_face_model_gets_its_q_k_rows_permuted(mistral_dir, tmp_path):
    cfg = Config()
    cfg.model.name = str(mistral_dir)
    folder, model = random_adapter(cfg, tmp_path / "adapter")
    result = export_gguf(cfg, folder, tmp_path / "m.gguf", "f32")
    assert result["permuted_qk"]
    got = tensors(tmp_path / "m.gguf")
    q, k = fused(model, "model.layers.1.self_attn.q_proj"), fused(model, "model.layers.1.self_attn.k_proj")
    assert np.array_equal(got["blk.1.attn_q.weight"][1], permute_for_gguf(q, 4))
    assert np.array_equal(got["blk.1.attn_k.weight"][1], permute_for_gguf(k, 2))
    assert not np.array_equal(got["blk.1.attn_q.weight"][1], q)  # the permutation moved rows
    assert np.array_equal(got["blk.1.attn_v.weight"][1], fused(model, "model.layers.1.self_attn.v_proj"))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert types[tokens.index("[INST]")] == gguf.TokenType.CONTROL and fields["tokenizer.ggml.eos_token_id"] == 2
    assert "[INST]" in fields["tokenizer.chat_template"]


def test_permutation_pairs_each_heads_halves():
    """Row i and i + d/2 of a head (Hugging Face's rotate-half pair) become neighbours (llama.cpp's pair)."""
    d, heads = 8, 2
    w = np.arange(heads * d)[:, None].astype(np.float32)
    p = permute_for_gguf(w, heads)[:, 0]
    assert p[:d].tolist() == [0, 4, 1, 5, 2, 6, 3, 7] and p[d:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


def test_q_k_biases_are_permuted_with_their_rows(mistral_dir, tmp_path):
    """A llama with attention biases (attention_bias: true): each q/k bias moves with its weight's row, as
    llama.cpp's converter does (bench/check_gguf.py found the biases left behind, and llama.cpp off by 0.09)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    biased = tmp_path / "biased"
    shutil.copytree(mistral_dir, biased)
    config = json.loads((biased / "config.json").read_text()) | {"attention_bias": True}
    (biased / "config.json").write_text(json.dumps(config))
    cfg = Config()
    cfg.model.name = str(biased)
    model = llama.Model(llama.ModelArgs.from_dict(config | {"model_type": "llama"}))
    weights = dict(tree_flatten(model.parameters()))
    weights = {k: (mx.arange(v.size, dtype=mx.float32).reshape(v.shape) if k.endswith("bias") else v)
               for k, v in weights.items()}
    mx.save_safetensors(str(biased / "model.safetensors"), weights)
    export_gguf(cfg, None, tmp_path / "b.gguf", "f32")
    got = tensors(tmp_path / "b.gguf")
    q_bias = np.asarray(weights["model.layers.0.self_attn.q_proj.bias"])
    assert np.array_equal(got["blk.0.attn_q.bias"][1], permute_for_gguf(q_bias, 4))
    assert np.array_equal(got["blk.0.attn_k.bias"][1],
                          permute_for_gguf(np.asarray(weights["model.layers.0.self_attn.k_proj.bias"]), 2))
    assert np.array_equal(got["blk.0.attn_v.bias"][1], np.asarray(weights["model.layers.0.self_attn.v_proj.bias"]))


def test_an_unknown_architecture_is_refused_before_loading(mistral_dir, tmp_path):
    other = tmp_path / "gemma-ish"
    shutil.copytree(mistral_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "gemma"}))
    cfg = Config()
    cfg.model.name = str(other)
    with pytest.raises(ExportError, match=r"model_type 'gemma': the GGUF export writes llama, mistral models"):
        export_gguf(cfg, None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_full_disk_mid_write_leaves_no_file(mistral_dir, tmp_path, monkeypatch):
    cfg = Config()
    cfg.model.name = str(mistral_dir)
    calls = []
    real = gguf.GGUFWriter.write_tensor_data

    def write(self, tensor, *args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *args, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
    with pytest.raises(ExportError, match=r"could not write the GGUF file \(No space left on device\); nothing"):
        export_gguf(cfg, None, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp file


def test_refusals_name_what_to_do(mistral_dir, embedded_adapter, tmp_path):
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(ExportUsageError, match="exists; name a new file"):
        export_gguf(Config(), None, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    with pytest.raises(ExportUsageError, match="--quant q3_k: not a GGUF type we write; use one of f32, f16"):
        export_gguf(Config(), None, tmp_path / "x.gguf", "q3_k")
    cfg = Config()
    cfg.model.name = str(mistral_dir)  # the embedded model's adapter on another base
    with pytest.raises(AdapterError):
        export_gguf(cfg, embedded_adapter[0], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.e2e
def test_the_export_command(tmp_path):
    done = lora_tui("export", "--to", "gguf", "--quant", "q4_0", "--out", tmp_path / "base.gguf")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["format"] == "gguf" and result["bytes"] == (tmp_path / "base.gguf").stat().st_size
    again = lora_tui("export", "--to", "gguf", "--out", tmp_path / "base.gguf")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr
    peft = lora_tui("export", "--to", "peft", "--out", tmp_path / "p")
    assert peft.returncode == 2 and "needs --adapter" in peft.stderr
