"""Chat decoding on the embedded model: the CPU decoding layout and the per-conversation prompt cache
change speed only, never what the model says."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.config.schema import Config
from engine.generate.decoding import PromptCache, TransposedLinear, decoding_layout, load_for_chat
from engine.generate.reply import GenerationSettings, reply, stream_reply
from engine.model.loading import load_model

GREEDY = GenerationSettings(max_tokens=24, temperature=0.0)
TURN1 = [{"role": "system", "content": "You are a concise geography tutor."},
         {"role": "user", "content": "What is the capital of France?"}]


def test_layout_keeps_logits_and_greedy_reply(embedded_dir):
    plain, tok, _ = load_model(Config().model)
    laid_out, _, _ = load_for_chat(Config())
    changed = [m for _, m in laid_out.named_modules() if isinstance(m, TransposedLinear)]
    assert len(changed) == 2 * len(laid_out.layers)  # gate_proj and up_proj of every block
    assert hasattr(laid_out.model.embed_tokens, "weight_t")  # the tied head got its transposed copy
    x = mx.array(tok.encode("The quick brown fox jumps over the lazy dog"))[None]
    np.testing.assert_allclose(np.array(laid_out(x)), np.array(plain(x)), rtol=1e-4, atol=1e-4)
    assert reply(laid_out, tok, TURN1, GREEDY) == reply(plain, tok, TURN1, GREEDY)
    assert "Paris" in reply(laid_out, tok, TURN1, GREEDY)


def test_layout_leaves_narrow_and_quantized_layers_alone(embedded_dir):
    cfg = Config()
    cfg.model.quantized_base = "keep"
    model, _, _ = load_model(cfg.model)
    assert decoding_layout(model) == 0  # 4-bit weights: quantized kernels, nothing to transpose
    plain, _, _ = load_model(Config().model)
    decoding_layout(plain)
    attn = plain.layers[0].self_attn
    assert all(type(getattr(attn, k)) is nn.Linear for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert type(plain.layers[0].mlp.down_proj) is nn.Linear


def test_second_turn_reuses_the_first_and_answers_the_same(embedded_dir):
    model, tok, _ = load_for_chat(Config())
    cache = PromptCache()
    first = "".join(c.text for c in stream_reply(model, tok, TURN1, GREEDY, prompt_cache=cache))
    turn1_ids = tok.encode(tok.apply_chat_template(TURN1, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
    assert cache.tokens[:len(turn1_ids)] == turn1_ids and len(cache.tokens) > len(turn1_ids)
    turn2 = TURN1 + [{"role": "assistant", "content": first},
                     {"role": "user", "content": "And of Italy?"}]
    ids2 = tok.encode(tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)
    kv, reused = cache.take(model, ids2)
    assert reused >= len(turn1_ids)  # the first turn (and most of the reply) is not read again
    cache.keep(kv, ids2[:reused])
    with_cache = "".join(c.text for c in stream_reply(model, tok, turn2, GREEDY, prompt_cache=cache)).strip()
    assert with_cache == reply(model, tok, turn2, GREEDY)


def test_a_reply_stopped_early_leaves_a_usable_cache(embedded_dir):
    model, tok, _ = load_for_chat(Config())
    cache = PromptCache()
    stream = stream_reply(model, tok, TURN1, GenerationSettings(max_tokens=64), prompt_cache=cache)
    partial = "".join(next(stream).text for _ in range(3))
    stream.close()  # what the Stop button does
    assert cache.cache is not None and len(cache.tokens) == cache.cache[0].offset
    turn2 = TURN1 + [{"role": "assistant", "content": partial}, {"role": "user", "content": "Go on."}]
    got = "".join(c.text for c in stream_reply(model, tok, turn2, GREEDY, prompt_cache=cache)).strip()
    assert got == reply(model, tok, turn2, GREEDY)


def _nudged_adapter(folder, cfg):
    """A real adapter folder in mlx-lm's format whose answers differ from the base model's."""
    from mlx.utils import tree_flatten, tree_unflatten

    from engine.model.adapters import apply_lora, save_adapters
    model, _, _ = load_model(cfg.model)
    acfg = apply_lora(model, cfg.lora, lean=False)
    mx.random.seed(3)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.5 if k.endswith("lora_b") else v)
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    save_adapters(model, acfg, folder)
    return folder


def test_side_by_side_chat_loads_the_model_once_and_answers_as_base_exactly(embedded_dir, tmp_path, monkeypatch):
    """Base and adapter side by side: one load (the adapter's model answers as the base with its adapter
    layers swapped out), and each answer is what a model loaded for that side alone says."""
    import engine.generate.decoding
    from engine.protocol import Generate, GenerationDone
    from engine.worker import EngineWorker

    cfg = Config()
    adapter = str(_nudged_adapter(tmp_path / "adapter", cfg))
    loads = []
    real_load = engine.generate.decoding.load_for_chat
    monkeypatch.setattr(engine.generate.decoding, "load_for_chat", lambda *a: loads.append(a[1:]) or real_load(*a))
    events = []
    worker = EngineWorker(events.append)
    order = [adapter, None, adapter, None]  # what the chat screen sends for two side-by-side turns
    for i, which in enumerate(order):
        worker._handle(Generate(cfg, tuple(TURN1), GREEDY, which, i))
    answers = {e.request_id: e.text for e in events if isinstance(e, GenerationDone)}
    assert loads == [(adapter,)]
    base_model, tok, _ = real_load(cfg)
    alone_base = reply(base_model, tok, TURN1, GREEDY)
    del base_model
    adapter_model, _, _ = real_load(cfg, adapter)
    alone_adapter = reply(adapter_model, tok, TURN1, GREEDY)
    assert alone_adapter != alone_base  # the adapter changes what the model says
    assert [answers[i].strip() for i in range(4)] == [alone_adapter, alone_base, alone_adapter, alone_base]
