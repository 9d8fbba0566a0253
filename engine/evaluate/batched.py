"""Greedy answers to many prompts at once, with mlx-lm's batch_generate: the held-out metrics' generation.

Prompts are rendered as engine/generate/reply.py renders a chat's (the model's own chat template, through
ChatEncoder.prompt_text) and stop where it stops (the tokenizer's end-of-sequence tokens).

Reading the prompts costs more than writing the answers on a CPU: data/heldout.jsonl's prompts are ~230
tokens, ~200 of them one of three system prompts, against answers of 10-60 tokens. So prompts are sorted
(those that share a system prompt come together, and lengths are close), and the prefix that a run of
sorted prompts shares is read once into a KV cache that batch_generate starts each of them from (its
`prompt_caches`, which it copies, left-padding shorter ones); only the rest of each prompt is read in the batch.

An answer is the one-by-one greedy answer up to float rounding: a batch's matmuls may sum in another order
than one prompt's, and where two tokens' logits tie to the last bit the argmax can differ
(tests/test_metrics.py checks a few prompts, bench/bench_eval.py counts over 100).
"""

from __future__ import annotations

from typing import Callable

from engine.data.encode import ChatEncoder

MIN_SHARED = 16  # tokens: a shorter common prefix is not worth a cache of its own


def prompt_ids(tokenizer, prompts: list[tuple[list[dict], list | None]]) -> list[list[int]]:
    """Each (messages, tools) rendered with the chat template, ending in the assistant's header."""
    encoder = ChatEncoder(tokenizer)
    return [tokenizer.encode(encoder.prompt_text(messages, tools), add_special_tokens=False)
            for messages, tools in prompts]


def batched_answers(model, tokenizer, prompts: list[tuple[list[dict], list | None]], max_tokens: int,
                    batch_size: int = 16, should_stop: Callable[[], bool] | None = None,
                    on_batch: Callable[[int, int], None] | None = None,
                    share_prefixes: bool = True) -> list[str] | None:
    """The greedy answer to each (messages, tools), stripped as reply() strips it, `batch_size` prompts at a
    time; None when `should_stop` said so (asked between batches). `on_batch(done, total)` after each.
    `share_prefixes=False` reads every prompt whole in the batch (bench/bench_eval.py measures the gain)."""
    from mlx_lm.generate import batch_generate  # imported here: the app imports the engine at start-up
    from mlx_lm.sample_utils import make_sampler
    ids = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda k: ids[k])
    greedy = make_sampler(temp=0.0)
    answers: list[str | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        if should_stop is not None and should_stop():
            return None
        chunk = [ids[k] for k in order[start:start + batch_size]]
        caches, rests = shared_prefixes(model, chunk) if share_prefixes else (None, chunk)
        # One batch_generate per chunk, sized to it: the chunk is read and decoded together, and a stop
        # waits for one chunk at most.
        out = batch_generate(model, tokenizer, rests, prompt_caches=caches, max_tokens=max_tokens,
                             sampler=greedy, prefill_batch_size=len(chunk), completion_batch_size=len(chunk))
        for k, text in zip(order[start:start + batch_size], out.texts):
            answers[k] = text.strip()
        if on_batch is not None:
            on_batch(start + len(chunk), len(ids))
    return answers  # type: ignore[return-value]


def shared_prefixes(model, chunk: list[list[int]]) -> tuple[list | None, list[list[int]]]:
    """(a KV cache per prompt, what of each prompt is left to read): each run of (sorted) prompts that
    shares a prefix of MIN_SHARED tokens or more starts from one cache of that prefix, read once; a prompt
    that shares none starts from its own whole prompt but the last token. (None, chunk) for a model whose
    caches batch_generate cannot batch with history."""
    from mlx_lm.models.cache import make_prompt_cache

    from engine.generate.decoding import prefill
    if not all(hasattr(c, "merge") for c in make_prompt_cache(model)):
        return None, chunk
    caches, rests, i = [], [], 0
    while i < len(chunk):
        j, shared = i + 1, len(chunk[i]) - 1  # alone: all but the last token, as reply() reads it
        while j < len(chunk):
            common = min(shared, _common(chunk[i], chunk[j]), len(chunk[j]) - 1)
            if common < MIN_SHARED:
                break
            shared, j = common, j + 1
        cache = make_prompt_cache(model)
        prefill(model, chunk[i][:shared + 1], cache)  # reads all but the last of what it is given
        for k in range(i, j):
            caches.append(cache)  # batch_generate copies it into its batch cache: never written to
            rests.append(chunk[k][shared:])
        i = j
    return caches, rests


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
