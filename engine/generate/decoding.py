"""How prompts and weights are fed to the model when generating (engine/generate/reply.py streams the reply).

Two things are ours, both measured against `mlx_lm.generate` in bench/bench_cpu.py:
- `PromptCache`: a chat keeps the KV cache of its last turn, so the next turn prefills only the new
  tokens (the reply just generated is already in the cache, and so is the whole earlier conversation).
  mlx-lm's generate prefills the whole conversation on every turn.
- `decoding_layout` (chat models on the CPU): a float matrix-vector product through MKL/OpenBLAS streams
  its weight about twice as fast when the stored matrix has the longer side contiguous. Here that means
  the wide projections (MLP gate/up, the output head) are kept transposed. Decoding SmolLM2 went from
  ~20 to ~24-26 tokens/s on this machine's 2 cores; the greedy output is unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.model.head import split_head
from engine.model.adapters import load_with_adapter
from engine.model.loading import load_model


class TransposedLinear(nn.Module):
    """A frozen nn.Linear stored as weight.T (in x out), for fast matrix-vector products on the CPU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias
        self.freeze()

    def __call__(self, x):
        y = x @ self.weight_t
        return y + self.bias if "bias" in self else y


class _TransposedHeadEmbedding(nn.Embedding):
    """A tied embedding that also keeps its transpose for the output projection."""

    def as_linear(self, x):
        return x @ self.weight_t


def decoding_layout(model: nn.Module) -> int:
    """For a model used only to generate on the CPU: store each float Linear wider than it is deep
    transposed, and give a tied embedding a transposed copy for the head (the one extra copy). Returns
    how many matrices changed. Training, LoRA application and fusing need the original layout."""
    if mx.default_device() != mx.cpu:
        return 0
    swaps = [(parent, key, child) for _, parent in model.named_modules()
             for key, child in parent.children().items()
             if type(child) is nn.Linear and child.weight.shape[0] > child.weight.shape[1]]
    for parent, key, child in swaps:
        setattr(parent, key, TransposedLinear(child))
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = split_head(model) is not None and getattr(model.args, "tie_word_embeddings", False)
    if tied and type(embed) is nn.Embedding:
        embed.weight_t = mx.contiguous(embed.weight.T)
        embed.__class__ = _TransposedHeadEmbedding
        embed.freeze()
        swaps.append(embed)
    mx.eval(model.parameters())
    return len(swaps)


def prefill(model, ids: list[int], cache, chunk: int = 2048, should_stop=None) -> bool:
    """Run all but the last of `ids` into `cache` (on mlx-lm's generation stream, where decoding runs).
    Only the cache is evaluated, so the output head never runs for these positions. `should_stop` is
    asked between chunks (a long prompt takes minutes on a CPU); False when it stopped the prefill."""
    from mlx_lm.generate import generation_stream
    with mx.stream(generation_stream):
        for start in range(0, len(ids) - 1, chunk):
            if should_stop is not None and should_stop():
                return False
            model(mx.array(ids[start:min(start + chunk, len(ids) - 1)])[None], cache=cache)
            mx.eval([c.state for c in cache])
    return True


class PromptCache:
    """The KV cache after a chat's last reply, and the tokens it holds."""

    def __init__(self):
        self.cache, self.tokens = None, []

    def take(self, model, ids: list[int]):
        """(cache, n): a cache holding ids[:n] (reused where the conversation is unchanged), n < len(ids)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
        cache, self.cache = self.cache, None  # handed over: a failed reply must not leave it half-updated
        if cache is not None:
            common, limit = 0, min(len(self.tokens), len(ids) - 1)
            while common < limit and self.tokens[common] == ids[common]:
                common += 1
            extra = len(self.tokens) - common
            if common and (extra == 0 or can_trim_prompt_cache(cache)):
                trim_prompt_cache(cache, extra)
                return cache, common
        return make_prompt_cache(model), 0

    def keep(self, cache, tokens: list[int]) -> None:
        """Remember `cache` after a reply; `tokens` are the prompt then every token generated."""
        offset = getattr(cache[0], "offset", None) if cache else None
        if isinstance(offset, int) and offset <= len(tokens):
            self.cache, self.tokens = cache, tokens[:offset]


def load_for_chat(cfg, adapter: str | None = None):
    """(model, tokenizer, info) to chat with: the configured base, an adapter if given, decoding layout."""
    model, tokenizer, info = load_with_adapter(cfg, adapter) if adapter else load_model(cfg.model)
    decoding_layout(model)
    return model, tokenizer, info
