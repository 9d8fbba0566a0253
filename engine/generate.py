"""Text generation for chat, samples and the behaviour metric, on mlx-lm's stream_generate and samplers."""

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


def stream_reply(model, tokenizer, messages: list[dict], settings: GenerationSettings,
                 tools=None) -> Iterator[Chunk]:
    """Stream the assistant's reply to `messages`, rendered with the model's own chat template."""
    from mlx_lm.generate import stream_generate  # imported here: the UI imports this module at start-up
    from mlx_lm.sample_utils import make_sampler

    from engine.data.encode import ChatEncoder
    prompt = ChatEncoder(tokenizer).prompt_text(messages, tools)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    sampler = make_sampler(temp=settings.temperature, top_p=settings.top_p if settings.temperature > 0 else 0.0)
    for r in stream_generate(model, tokenizer, ids, max_tokens=settings.max_tokens, sampler=sampler):
        yield Chunk(r.text, r.generation_tokens, r.prompt_tps, r.generation_tps,
                    r.finish_reason is not None, r.finish_reason)


def reply(model, tokenizer, messages: list[dict], settings: GenerationSettings, tools=None) -> str:
    return "".join(c.text for c in stream_reply(model, tokenizer, messages, settings, tools)).strip()
