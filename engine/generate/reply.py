"""Text generation for chat, samples and the behaviour metric, on mlx-lm's stream_generate and samplers.

The prompt goes through engine/generate/decoding.py's prefill (reusing a chat's cache from its last turn when one is
given) before stream_generate takes over.
This module is imported by the UI at start-up, so MLX is imported only when generating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(frozen=True)
class Chunk:
    text: str  # the new text
    tokens: int  # tokens generated so far
    prompt_tps: float
    generation_tps: float
    finished: bool
    finish_reason: str | None


# Prompt tokens read per step when the reader can stop the reply: on a CPU a step of 2048 at a long
# context took 20-90 s, too long to wait for a Stop.
STOPPABLE_PREFILL_CHUNK = 256


def stream_reply(model, tokenizer, messages: list[dict], settings: GenerationSettings,
                 tools=None, prompt_cache=None, should_stop=None) -> Iterator[Chunk]:
    """Stream the assistant's reply to `messages`, rendered with the model's own chat template.
    `prompt_cache` (a decoding.PromptCache kept per conversation) skips re-reading earlier turns;
    `should_stop` is also asked while the prompt is read (nothing is yielded when it stops there)."""
    import time

    from mlx_lm.generate import stream_generate  # imported here: the UI imports this module at start-up
    from mlx_lm.sample_utils import make_sampler

    from engine.data.encode import ChatEncoder
    from engine.generate.decoding import PromptCache, prefill
    prompt = ChatEncoder(tokenizer).prompt_text(messages, tools)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    sampler = make_sampler(temp=settings.temperature, top_p=settings.top_p if settings.temperature > 0 else 0.0)
    prompt_cache = prompt_cache or PromptCache()
    cache, reused = prompt_cache.take(model, ids)
    t0 = time.perf_counter()
    chunk = STOPPABLE_PREFILL_CHUNK if should_stop is not None else 2048
    if not prefill(model, ids[reused:], cache, chunk, should_stop):
        prompt_cache.keep(cache, ids)  # what was read stays cached: its offset says how much
        return
    prompt_s = time.perf_counter() - t0
    tokens = list(ids)
    try:
        for r in stream_generate(model, tokenizer, ids[-1:], max_tokens=settings.max_tokens, sampler=sampler,
                                 prompt_cache=cache):
            tokens.append(r.token)
            prompt_tps = (len(ids) - reused) / (prompt_s + r.prompt_tokens / max(r.prompt_tps, 1e-9))
            yield Chunk(r.text, r.generation_tokens, prompt_tps, r.generation_tps,
                        r.finish_reason is not None, r.finish_reason)
    finally:  # also when the reader stops early (the Stop button): what was fed is in the cache
        prompt_cache.keep(cache, tokens)


def reply(model, tokenizer, messages: list[dict], settings: GenerationSettings, tools=None) -> str:
    return "".join(c.text for c in stream_reply(model, tokenizer, messages, settings, tools)).strip()
